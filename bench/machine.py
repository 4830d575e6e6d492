"""What machine a benchmark ran on: an alias of `cachefit.machine` (kept so old imports work)."""

from cachefit.machine import MACHINE_FIELDS, gpu_info, machine_info, machine_line  # noqa: F401

__all__ = ["machine_info", "machine_line"]
