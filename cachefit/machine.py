"""What machine a figure was measured on: one record, used by the executor and the benchmarks.

`machine_info` returns the record every result file stores under
``"machine"``; `MACHINE_FIELDS` documents its keys.  The executor adds the
GPU's keys (`gpu_info`) when it ran on CUDA; the benchmark report adds the
git commit and the date.  Only the standard library is imported here.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["MACHINE_FIELDS", "GPU_FIELDS", "machine_info", "machine_line", "gpu_info", "package_version"]

#: Keys of `machine_info`: name -> meaning.
MACHINE_FIELDS = {
    "cpu": "CPU model name (/proc/cpuinfo, else platform.processor())",
    "cores": "logical CPUs (os.cpu_count())",
    "ram_bytes": "physical memory in bytes (None when the platform does not say)",
    "os": "platform.platform()",
    "python": "Python version",
    "versions": "installed versions of cachefit, numpy, networkx, ortools, torch, deepspeed, torchgpipe "
                "(None when absent)",
}

#: Keys `gpu_info` adds for a CUDA run: name -> meaning.
GPU_FIELDS = {
    "gpu": "the CUDA device's name",
    "gpu_l2_bytes": "its L2 cache in bytes (None when torch does not report it)",
    "gpu_memory_bytes": "its memory in bytes",
    "cuda": "the CUDA version torch was built with",
}

_PACKAGES = ("cachefit", "numpy", "networkx", "ortools", "torch", "deepspeed", "torchgpipe")


def package_version(package):
    """The installed version of `package`, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info():
    """The machine record: a JSON-ready dict with the keys of `MACHINE_FIELDS`.

    Examples
    --------
    >>> sorted(machine_info()) == sorted(MACHINE_FIELDS)
    True
    """
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {package: package_version(package) for package in _PACKAGES},
    }


def gpu_info(device=None):
    """The keys of `GPU_FIELDS` for a CUDA `device` (default the current one); imports torch."""
    import torch

    index = torch.cuda.current_device() if device is None or torch.device(device).index is None \
        else torch.device(device).index
    props = torch.cuda.get_device_properties(index)
    return {"gpu": props.name, "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
            "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda}


def machine_line(info=None):
    """One line naming the machine, for printed results.

    Examples
    --------
    >>> machine_line({"cpu": "X", "cores": 2, "ram_bytes": 2**31, "python": "3.12.0"})
    'X, 2 cores, 2 GiB RAM, Python 3.12.0'
    """
    info = machine_info() if info is None else info
    memory = f", {info['ram_bytes'] / 2**30:.0f} GiB RAM" if info.get("ram_bytes") else ""
    return f"{info['cpu']}, {info['cores']} cores{memory}, Python {info['python']}"
