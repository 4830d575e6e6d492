"""What machine a benchmark ran on, for every printed figure."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

__all__ = ["machine_info", "machine_line"]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info():
    """A JSON-ready dict: CPU model, cores, memory, Python and package versions."""
    versions = {}
    for package in ("cachefit", "numpy", "networkx", "ortools", "torch", "deepspeed", "torchgpipe"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }


def machine_line():
    """One line naming the machine, for printed results."""
    info = machine_info()
    memory = f", {info['memory_bytes'] / 2**30:.0f} GiB RAM" if info["memory_bytes"] else ""
    return f"{info['cpu']}, {info['cores']} cores{memory}, Python {info['python']}"
