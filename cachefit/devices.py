"""Device presets: named capacities, and the figures a time estimate needs, each with its source.

`DEVICES` maps capacity names (``"h100-l2"``, ``"h100-hbm"``, ...) to bytes,
for ``--capacity``; `PRESETS` maps device names (``"h100"``, ``"mi300x"``,
``"groq-lpu"``, ...) to a `Device` holding the on-chip memory, the off-chip
memory, their bandwidths and the peak dense BF16 FLOP/s, with a source for
every number (`cachefit devices --sources` prints them).

Units
-----
Cache sizes are binary: NVIDIA's "50 MB" H100 L2 is 50 MiB (52,428,800 B,
what the driver reports), and likewise the other GPU caches (they are built
from power-of-two slices).  HBM and GDDR sizes are the product names' figures
read as decimal gigabytes (H100 80 GB = 80·10⁹ B), a little below what the
driver reports (an H100 80GB shows 81,559 MiB ≈ 85.5·10⁹ B; an H200 143,771
MiB ≈ 150.8·10⁹ B), so plans made with these names are conservative; pass
the exact byte count for a tighter plan.  SRAM sizes that the vendor states
in "MB"/"GB" without saying which are read as decimal (the smaller reading).
Bandwidths are bytes per second, decimal (3.35 TB/s = 3.35·10¹² B/s).

A figure the vendor does not publish is ``None`` and printed "not
published"; nothing is filled in by guess.  A figure taken from a third
party rather than the vendor says so in its source.

Examples
--------
>>> parse_capacity("h100-l2")
52428800
>>> parse_capacity("1.5GiB")
1610612736
>>> parse_capacity(4096)
4096
>>> get_device("mi300x").on_chip_bytes == 256 * 2**20
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError
from .units import parse_bytes

__all__ = ["DEVICES", "PRESETS", "Device", "get_device", "parse_capacity", "device_names"]

MiB, MB, GB, TB = 2**20, 10**6, 10**9, 10**12


@dataclass(frozen=True)
class Device:
    """The figures of one accelerator that a plan and a time estimate use.

    Attributes
    ----------
    name : str
        Preset name (``"h100"``), or ``"measured"`` for a probe of this machine.
    label : str
        The product as sold (``"NVIDIA H100 SXM5 80GB"``).
    on_chip_kind : str
        What the on-chip level is (``"L2"``, ``"Infinity Cache"``, ``"SRAM"``).
    on_chip_bytes : int or None
        On-chip capacity in bytes; None when not published.
    memory_kind : str or None
        The off-chip memory (``"HBM3"``, ``"GDDR6X"``); None when the chip has
        none of its own (weights stream in from elsewhere, or live in SRAM).
    memory_bytes : int or None
        Off-chip capacity in bytes.
    memory_bandwidth : float or None
        Off-chip bandwidth, bytes/s.
    on_chip_bandwidth : float or None
        On-chip bandwidth, bytes/s; None when not published.
    peak_flops : float or None
        Peak dense BF16 FLOP/s (without structured sparsity).
    sources : dict
        Field name -> where the figure comes from.
    notes : str
        Caveats (units, how a figure was derived).
    """

    name: str
    label: str
    on_chip_kind: str
    on_chip_bytes: int | None
    memory_kind: str | None
    memory_bytes: int | None
    memory_bandwidth: float | None
    on_chip_bandwidth: float | None
    peak_flops: float | None
    sources: dict = field(default_factory=dict, compare=False, hash=False)
    notes: str = ""

    @property
    def capacity_names(self):
        """The `DEVICES` names of this device's capacities, on-chip first."""
        names = []
        if self.on_chip_bytes is not None:
            names.append(f"{self.name}-{_SUFFIX[self.on_chip_kind]}")
        if self.memory_bytes is not None:
            names.append(f"{self.name}-{'gddr' if self.memory_kind.startswith('GDDR') else 'hbm'}")
        return tuple(names)


_SUFFIX = {"L2": "l2", "Infinity Cache": "llc", "SRAM": "sram"}

_NVIDIA_HOPPER = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 50 MB L2"
_SPARSITY = "the datasheet's 'with sparsity' figure halved"

#: Preset devices by name; every figure has a source in `Device.sources`.
PRESETS = {
    "h100": Device(
        "h100", "NVIDIA H100 SXM5 80GB", "L2", 50 * MiB, "HBM3", 80 * GB, 3.35 * TB, None, 989e12,
        sources={"on_chip_bytes": _NVIDIA_HOPPER + " (the driver reports 50 MiB)",
                 "memory_bytes": "NVIDIA H100 datasheet: 80 GB (SXM)",
                 "memory_bandwidth": "NVIDIA H100 datasheet: 3.35 TB/s (SXM)",
                 "on_chip_bandwidth": "not published by NVIDIA",
                 "peak_flops": "NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM); "
                               + _SPARSITY},
        notes="the vendor's '50 MB' L2 is 50 MiB"),
    "h200": Device(
        "h200", "NVIDIA H200 SXM 141GB", "L2", 60 * MiB, "HBM3e", 141 * GB, 4.8 * TB, None, 989e12,
        sources={"on_chip_bytes": "not published for the H200: NVIDIA's H200 datasheet lists no L2 size. The H200 is "
                                  "the GH100 die (as the H100), whose full implementation has 60 MB of L2 "
                                  "(NVIDIA H100 Tensor Core GPU Architecture whitepaper, 2022); the H100 SXM5 "
                                  "product enables 50 MB of it. 60 MiB is the full die's figure, kept because "
                                  "the capacity name `h200-l2` is fixed at 60 MiB",
                 "memory_bytes": "NVIDIA H200 datasheet: 141 GB",
                 "memory_bandwidth": "NVIDIA H200 datasheet: 4.8 TB/s",
                 "on_chip_bandwidth": "not published by NVIDIA",
                 "peak_flops": "NVIDIA H200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity (SXM); "
                               + _SPARSITY},
        notes="the L2 size is not published for the H200; 60 MiB (h200-l2) is the full GH100 die's L2, an "
              "upper bound: if the H200 enables what the H100 SXM5 does, its L2 is 50 MiB and plans made "
              "for h200-l2 may not fit; pass --capacity 50MiB (or h100-l2) for the conservative figure"),
    "a100": Device(
        "a100", "NVIDIA A100 SXM4 80GB", "L2", 40 * MiB, "HBM2e", 80 * GB, 2.039 * TB, None, 312e12,
        sources={"on_chip_bytes": "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 40 MB L2",
                 "memory_bytes": "NVIDIA A100 datasheet: 80 GB HBM2e",
                 "memory_bandwidth": "NVIDIA A100 datasheet: 2,039 GB/s (SXM 80GB)",
                 "on_chip_bandwidth": "not published by NVIDIA as an absolute figure",
                 "peak_flops": "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"},
        notes="the vendor's '40 MB' L2 is 40 MiB"),
    "b200": Device(
        "b200", "NVIDIA B200 (HGX B200)", "L2", None, "HBM3e", 180 * GB, 8 * TB, None, 2.25e15,
        sources={"on_chip_bytes": "not published in NVIDIA's B200/HGX B200 datasheets",
                 "memory_bytes": "NVIDIA DGX B200 datasheet: 1,440 GB GPU memory for 8 GPUs = 180 GB each",
                 "memory_bandwidth": "NVIDIA HGX B200 specifications: 8 TB/s per GPU (64 TB/s for 8)",
                 "on_chip_bandwidth": "not published by NVIDIA",
                 "peak_flops": "NVIDIA HGX B200 specifications: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs; "
                               "per GPU and dense: 36 / 8 / 2 = 2.25 PFLOPS"},
        notes="earlier NVIDIA material says 192 GB per B200; the shipping HGX/DGX B200 figure, 180 GB, is used"),
    "h20": Device(
        "h20", "NVIDIA H20 96GB", "L2", 60 * MiB, "HBM3", 96 * GB, 4.0 * TB, None, 148e12,
        sources={"on_chip_bytes": "reported (NVIDIA H20 partner specification sheet as published by the "
                                  "press, 2023): 60 MB L2; NVIDIA publishes no H20 page",
                 "memory_bytes": "reported, same sheet: 96 GB HBM3",
                 "memory_bandwidth": "reported, same sheet: 4.0 TB/s",
                 "on_chip_bandwidth": "not published",
                 "peak_flops": "reported, same sheet: FP16/BF16 Tensor Core 148 TFLOPS dense"},
        notes="every H20 figure is third-party reported, not from an NVIDIA page"),
    "l40s": Device(
        "l40s", "NVIDIA L40S", "L2", 96 * MiB, "GDDR6", 48 * GB, 864 * GB, None, 362.05e12,
        sources={"on_chip_bytes": "reported (not in NVIDIA's L40S datasheet): 96 MB L2, the full AD102 "
                                  "L2 of the NVIDIA Ada Lovelace architecture whitepaper",
                 "memory_bytes": "NVIDIA L40S datasheet: 48 GB GDDR6 with ECC",
                 "memory_bandwidth": "NVIDIA L40S datasheet: 864 GB/s",
                 "on_chip_bandwidth": "not published by NVIDIA",
                 "peak_flops": "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"},
        notes="GDDR6, not HBM: the off-chip capacity name is l40s-gddr"),
    "rtx4090": Device(
        "rtx4090", "NVIDIA GeForce RTX 4090", "L2", 72 * MiB, "GDDR6X", 24 * GB, 1008 * GB, None, 165.2e12,
        sources={"on_chip_bytes": "NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 L2 72 MB (73,728 KB)",
                 "memory_bytes": "NVIDIA Ada Lovelace architecture whitepaper: 24 GB GDDR6X",
                 "memory_bandwidth": "NVIDIA Ada Lovelace architecture whitepaper: 1,008 GB/s",
                 "on_chip_bandwidth": "not published by NVIDIA",
                 "peak_flops": "NVIDIA Ada Lovelace architecture whitepaper: peak BF16 Tensor TFLOPS with "
                               "FP32 accumulate 165.2 (330.4 with sparsity)"},
        notes="GDDR6X, not HBM: the off-chip capacity name is rtx4090-gddr"),
    "mi300x": Device(
        "mi300x", "AMD Instinct MI300X", "Infinity Cache", 256 * MiB, "HBM3", 192 * GB, 5.3 * TB, 17.2 * TB,
        1307.4e12,
        sources={"on_chip_bytes": "AMD Instinct MI300X datasheet: 256 MB AMD Infinity Cache (the last-level "
                                  "cache shared by all XCDs)",
                 "memory_bytes": "AMD Instinct MI300X datasheet: 192 GB HBM3",
                 "memory_bandwidth": "AMD Instinct MI300X datasheet: 5.3 TB/s peak",
                 "on_chip_bandwidth": "AMD CDNA 3 architecture whitepaper: Infinity Cache peak bandwidth 17.2 TB/s",
                 "peak_flops": "AMD Instinct MI300X datasheet: peak BF16 1,307.4 TFLOPS dense "
                               "(2,614.9 with sparsity)"},
        notes="the on-chip level is the 256 MiB Infinity Cache (capacity name mi300x-llc), not the 4 MB "
              "per-XCD L2"),
    "groq-lpu": Device(
        "groq-lpu", "Groq LPU (GroqChip 1)", "SRAM", 230 * MB, None, None, None, 80 * TB, 188e12,
        sources={"on_chip_bytes": "Groq GroqChip / LPU product brief: 230 MB on-die SRAM",
                 "memory_bytes": "none: the LPU has no off-chip DRAM; a model is spread over many chips",
                 "memory_bandwidth": "none (no off-chip DRAM)",
                 "on_chip_bandwidth": "Groq GroqChip / LPU product brief: 80 TB/s on-die memory bandwidth",
                 "peak_flops": "Groq GroqChip / LPU product brief: 188 TFLOPS FP16"},
        notes="'230 MB' read as decimal; the FLOP/s figure is FP16, BF16 is not stated"),
    "wse-3": Device(
        "wse-3", "Cerebras WSE-3 (CS-3)", "SRAM", 44 * GB, None, None, None, 21e15, 125e15,
        sources={"on_chip_bytes": "Cerebras WSE-3 announcement (March 2024): 44 GB on-chip SRAM",
                 "memory_bytes": "none on the wafer: weights can stream from the external MemoryX unit, "
                                 "which is not device memory",
                 "memory_bandwidth": "none (no off-chip DRAM on the wafer)",
                 "on_chip_bandwidth": "Cerebras WSE-3 announcement: 21 PB/s memory bandwidth",
                 "peak_flops": "dense BF16 not published: Cerebras states only 125 PFLOPS 'peak AI' "
                               "performance (WSE-3 announcement, March 2024; precision and sparsity not "
                               "stated). That figure is used as an upper bound, so compute-bound times on "
                               "wse-3 are optimistic"},
        notes="'44 GB' read as decimal; the FLOP/s figure is NOT a dense BF16 figure (none is published): it "
              "is the vendor's 'peak AI' figure, an upper bound"),
}


def _capacities():
    names = {}
    for device in PRESETS.values():
        sizes = [size for size in (device.on_chip_bytes, device.memory_bytes) if size is not None]
        names.update(zip(device.capacity_names, sizes))
    return names


#: Named capacities in bytes (the first six are cachefit's original names).
DEVICES = {
    "h100-l2": 50 * MiB,
    "h200-l2": 60 * MiB,
    "a100-l2": 40 * MiB,
    "h100-hbm": 80 * GB,
    "h200-hbm": 141 * GB,
    "a100-hbm": 80 * GB,
    **_capacities(),
    "mi300x-infinity-cache": 256 * MiB,
}


def device_names():
    """The preset device names, in table order."""
    return tuple(PRESETS)


def get_device(name):
    """The preset `Device` called `name` (case-insensitive).

    A capacity name such as ``"h100-l2"`` or ``"h100-hbm"`` names its device too.

    Raises
    ------
    InputError
        Not a preset; the message lists them.

    Examples
    --------
    >>> get_device("H100").memory_bandwidth
    3350000000000.0
    >>> get_device("h100-hbm").name
    'h100'
    """
    if isinstance(name, Device):
        return name
    key = str(name).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    for device in PRESETS.values():
        if key in device.capacity_names or (key == "mi300x-infinity-cache" and device.name == "mi300x"):
            return device
    raise InputError(f"`device` must be one of {', '.join(PRESETS)} (or 'measured' where a probe is "
                     f"allowed), got {name!r}")


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
        raise InputError(f"{exc}; or a device name: {', '.join(DEVICES)} (see `cachefit devices`)") from None
    if capacity <= 0:
        raise InputError(f"`{name}` must be a positive number of bytes, got {value!r}")
    return capacity
