"""⌈f · x⌉ computed exactly: the one rounding every memory model with a streaming fraction uses."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..errors import InputError

__all__ = ["check_chunk_fraction", "scale_activation", "scale_activation_array"]


def check_chunk_fraction(chunk_fraction):
    """Return `chunk_fraction` as a float in (0, 1], else raise `InputError`."""
    if isinstance(chunk_fraction, bool) or not isinstance(chunk_fraction, (int, float, Fraction)):
        raise InputError(f"`chunk_fraction` must be a number in (0, 1], got {chunk_fraction!r}")
    value = float(chunk_fraction)
    if not (0.0 < value <= 1.0):
        raise InputError(f"`chunk_fraction` must be a number in (0, 1], got {chunk_fraction!r}")
    return value


def scale_activation(total, chunk_fraction):
    """⌈f · total⌉ computed exactly (f's float taken as the rational it denotes).

    >>> scale_activation(10, 0.25), scale_activation(10, 1/3), scale_activation(7, 1.0)
    (3, 4, 7)
    """
    if chunk_fraction == 1.0:
        return int(total)
    numerator, denominator = Fraction(chunk_fraction).as_integer_ratio()
    return -((-int(total) * numerator) // denominator)


def scale_activation_array(values, chunk_fraction, *, ceil=True):
    """⌈f·x⌉ (or ⌊f·x⌋ with ``ceil=False``) elementwise, exactly, as int64.

    f's float is taken as the rational it denotes, like `scale_activation`.
    When numerator × max(x) fits in int64 (every dyadic f such as 0.25, and
    byte counts < 2⁶³ / numerator) it is pure integer arithmetic; otherwise a
    float64 product, redone in exact integer arithmetic for the entries within
    rounding distance of an integer.  An object array (Python integers) is
    scaled with Python integers throughout.

    Examples
    --------
    >>> scale_activation_array([10, 7, 0], 0.25).tolist(), scale_activation_array([10, 7, 0], 0.25, ceil=False).tolist()
    ([3, 2, 0], [2, 1, 0])
    >>> scale_activation_array([3, 4], 1 / 3).tolist()
    [1, 2]
    """
    if isinstance(values, np.ndarray) and values.dtype == object:
        if chunk_fraction == 1.0:
            return values.copy()
        numerator, denominator = float(chunk_fraction).as_integer_ratio()
        return -((-values * numerator) // denominator) if ceil else (values * numerator) // denominator
    values = np.asarray(values, dtype=np.int64)
    if chunk_fraction == 1.0:
        return values.copy()
    numerator, denominator = float(chunk_fraction).as_integer_ratio()
    top = int(values.max()) if values.size else 0
    if top * numerator < 2**62:
        if ceil:
            return -((-values * numerator) // denominator)
        return (values * numerator) // denominator
    product = values.astype(np.float64) * chunk_fraction
    result = (np.ceil(product) if ceil else np.floor(product)).astype(np.int64)
    near = np.flatnonzero(np.abs(product - np.rint(product)) <= 1e-6 * np.maximum(1.0, product))
    if near.size:
        exact = values[near].astype(object) * numerator  # Python ints: no overflow
        result[near] = (-((-exact) // denominator) if ceil else exact // denominator).astype(np.int64)
    return result
