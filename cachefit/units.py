"""Byte quantities: parse ``"50MiB"``/``"50MB"``/ints, format sizes with a unit.

Binary prefixes (KiB, MiB, GiB, TiB, PiB) are powers of 1024; decimal ones
(KB, MB, GB, TB, PB) are powers of 1000.  A bare number is bytes.  The
prefix's case is free (``kB``, ``KB``, ``mib``, ``MIB``), but the final ``B``
must be upper-case: a lower-case ``b`` is the usual spelling of bits
(``50Mb`` is 50 megabits, 6.25 MB), so it is refused rather than guessed.  Parsing is
exact (decimal arithmetic): ``"1.5GiB"`` is 1610612736 bytes, and a value that
is not a whole number of bytes is refused rather than rounded.

Examples
--------
>>> parse_bytes("50MiB")
52428800
>>> parse_bytes("50MB")
50000000
>>> parse_bytes("50Mb")
Traceback (most recent call last):
...
cachefit.errors.InputError: `capacity` must be bytes, spelled with an upper-case B ('MB' or 'MiB'), got '50Mb': a lower-case 'b' means bits
>>> format_bytes(52428800)
'50.0 MiB'
>>> format_bytes(999)
'999 B'
>>> format_bytes(10**400)
'8.9e+384 PiB'
"""

from __future__ import annotations

import math
import re
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, localcontext

from .errors import InputError

__all__ = ["UNITS", "DTYPE_BYTES", "parse_bytes", "format_bytes", "format_count", "dtype_bytes"]

#: Multiplier of every accepted unit suffix (case-insensitive on the prefix; the final "B" is upper-case).
UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}

#: Bytes per element of the dtypes the builders accept.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}

_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

_FORMS = "an int of bytes or a string such as '50MiB', '50MB', '1.5GiB' or '4096'"


def parse_bytes(value, *, name="capacity"):
    """Return `value` as a non-negative whole number of bytes.

    Parameters
    ----------
    value : int or str
        Bytes as an int, or a string: a number and an optional unit
        (B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB; the prefix in
        any case, the ``B`` upper-case: ``50Mb``, bits, is refused).
    name : str
        The argument's name, used in error messages.

    Raises
    ------
    InputError
        `value` is negative, not finite, not a whole number of bytes, or not
        in an accepted form.
    """
    if isinstance(value, bool):
        raise InputError(f"`{name}` must be {_FORMS}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"`{name}` must be a non-negative number of bytes, got {value}; expected {_FORMS}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise InputError(f"`{name}` must be a non-negative whole number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise InputError(f"`{name}` must be {_FORMS}, got {type(value).__name__} {value!r}")
    match = _QUANTITY.match(value)
    unit = match.group(2).upper() if match else None
    if match is None or (unit and unit not in UNITS):
        raise InputError(f"`{name}` must be {_FORMS}, got {_shorten(value)}")
    if unit and not match.group(2).endswith("B"):
        prefix = unit[0] if len(unit) > 1 else ""
        spelled = f"'{prefix}B' or '{prefix}iB'" if prefix else "'B'"
        raise InputError(f"`{name}` must be bytes, spelled with an upper-case B ({spelled}), got "
                         f"{_shorten(value)}: a lower-case 'b' means bits")
    number = Decimal(match.group(1))  # exact: construction does not round
    if number and number.adjusted() > 24:  # checked before any arithmetic, which could overflow the context
        raise InputError(f"`{name}` is too large to be a number of bytes, got {_shorten(value)}; expected {_FORMS}")
    if number and number.adjusted() < -24:  # below 1e-24 B × the largest unit: not a whole number of bytes
        raise InputError(f"`{name}` must be a whole number of bytes, got {_shorten(value)}")
    try:
        with localcontext(Context(prec=80, traps=[InvalidOperation, Overflow, Inexact])):
            number = number * UNITS[unit or "B"]  # at most 40 whole digits: rounding drops only fraction
    except Inexact:
        raise InputError(f"`{name}` must be a whole number of bytes, got {_shorten(value)}") from None
    if number > Decimal(2) ** 80:
        raise InputError(f"`{name}` is too large to be a number of bytes, got {value!r}; expected {_FORMS}")
    if number != number.to_integral_value():
        raise InputError(f"`{name}` must be a whole number of bytes, got {value!r} = {number} B")
    return int(number)


def _shorten(value):
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(value)} characters)"


def format_bytes(num_bytes, *, binary=True, precision=1):
    """Format a byte count with its unit: ``'50.0 MiB'``, ``'1.2 GB'``, ``'999 B'``.

    `binary` chooses KiB/MiB/GiB (powers of 1024) or KB/MB/GB (powers of 1000).
    """
    base = 1024 if binary else 1000
    suffixes = ["KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["KB", "MB", "GB", "TB", "PB"]
    if isinstance(num_bytes, float) and not math.isfinite(num_bytes):
        return f"{num_bytes} B"
    num_bytes = int(num_bytes)
    if abs(num_bytes) < base:
        return f"{num_bytes} B"
    for power, suffix in enumerate(suffixes, start=1):
        if abs(num_bytes) < base ** (power + 1) or suffix == suffixes[-1]:
            break
    try:
        return f"{num_bytes / base ** power:.{precision}f} {suffix}"  # int / int: exact to the nearest float
    except OverflowError:  # beyond any float (a hostile file's 10**400): exact decimal, in scientific notation
        return f"{Decimal(num_bytes) / Decimal(base ** power):.{precision}e} {suffix}"


def format_count(value, unit=""):
    """A count with an SI prefix: ``format_count(1.3e13, "FLOP")`` is ``'13.0 TFLOP'``.

    Examples
    --------
    >>> format_count(13194139533312, "FLOP"), format_count(3187703808), format_count(512)
    ('13.2 TFLOP', '3.19 G', '512')
    """
    value = float(value)
    for threshold, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            scaled = value / threshold
            digits = 1 if unit else (2 if scaled < 10 else 1)
            return f"{scaled:.{digits}f} {prefix}{unit}"
    return f"{value:.0f}" + (f" {unit}" if unit else "")


def dtype_bytes(dtype):
    """Bytes per element of `dtype` (one of `DTYPE_BYTES`)."""
    try:
        return DTYPE_BYTES[str(dtype).lower()]
    except KeyError:
        raise InputError(
            f"`dtype` must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}") from None
