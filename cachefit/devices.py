"""Named capacities of common devices, and `parse_capacity`.

L2 sizes are the ones NVIDIA documents (H100: 50 MiB, H200: 60 MiB as the
driver reports it, A100: 40 MiB).  HBM sizes are the product names' figures
read as decimal gigabytes (H100 80 GB, H200 141 GB, A100 80 GB = 80·10⁹ B).
That is a little below what the driver reports (an H100 80GB shows 81,559 MiB
≈ 85.5·10⁹ B; an H200 143,771 MiB ≈ 150.8·10⁹ B), so plans made with these
names are conservative; pass the exact byte count for a tighter plan.

Examples
--------
>>> parse_capacity("h100-l2")
52428800
>>> parse_capacity("1.5GiB")
1610612736
>>> parse_capacity(4096)
4096
"""

from __future__ import annotations

from .errors import InputError
from .units import parse_bytes

__all__ = ["DEVICES", "parse_capacity"]

#: Named capacities in bytes.
DEVICES = {
    "h100-l2": 50 * 2**20,
    "h200-l2": 60 * 2**20,
    "a100-l2": 40 * 2**20,
    "h100-hbm": 80 * 10**9,
    "h200-hbm": 141 * 10**9,
    "a100-hbm": 80 * 10**9,
}


def parse_capacity(value, *, name="capacity"):
    """Return a positive capacity in bytes from a device name, a string or an int.

    Raises
    ------
    InputError
        Not a known device name nor a valid byte quantity, or not positive.
    """
    if isinstance(value, str) and value.strip().lower() in DEVICES:
        return DEVICES[value.strip().lower()]
    try:
        capacity = parse_bytes(value, name=name)
    except InputError as exc:
        raise InputError(f"{exc}; or a device name: {', '.join(DEVICES)}") from None
    if capacity <= 0:
        raise InputError(f"`{name}` must be a positive number of bytes, got {value!r}")
    return capacity
