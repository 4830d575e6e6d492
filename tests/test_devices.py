import pytest

from cachefit import InputError, parse_capacity
from cachefit.devices import DEVICES, PRESETS, Device, get_device

FIELDS = ("on_chip_bytes", "memory_bytes", "memory_bandwidth", "on_chip_bandwidth", "peak_flops")


class TestPresets:
    def test_required_devices_present(self):
        assert {"h100", "h200", "a100", "b200", "h20", "l40s", "rtx4090", "mi300x", "groq-lpu", "wse-3"} <= set(PRESETS)

    @pytest.mark.parametrize("name", list(PRESETS))
    def test_every_figure_has_a_source(self, name):
        device = PRESETS[name]
        for field in FIELDS:
            assert device.sources.get(field), (name, field)
            if getattr(device, field) is None:
                assert "not published" in device.sources[field] or device.sources[field].startswith("none")

    @pytest.mark.parametrize("name", list(PRESETS))
    def test_figures_are_positive_and_typed(self, name):
        device = PRESETS[name]
        for field in ("on_chip_bytes", "memory_bytes"):
            value = getattr(device, field)
            assert value is None or (isinstance(value, int) and value > 0)
        assert device.peak_flops > 0
        assert device.on_chip_bytes is not None or device.memory_bytes is not None

    def test_units_exact(self):
        # vendor "50 MB" L2 is 50 MiB; HBM sizes decimal; Infinity Cache binary; SRAM read decimal
        assert get_device("h100").on_chip_bytes == 52_428_800
        assert get_device("h100").memory_bytes == 80 * 10**9
        assert get_device("mi300x").on_chip_bytes == 256 * 2**20
        assert get_device("mi300x").on_chip_kind == "Infinity Cache"
        assert get_device("groq-lpu").on_chip_bytes == 230 * 10**6
        assert get_device("wse-3").on_chip_bytes == 44 * 10**9
        assert get_device("rtx4090").on_chip_bytes == 72 * 2**20

    def test_sram_chips_have_no_offchip_memory(self):
        for name in ("groq-lpu", "wse-3"):
            device = get_device(name)
            assert device.memory_bytes is None and device.memory_bandwidth is None
            assert device.capacity_names == (f"{name}-sram",)


class TestCapacityNames:
    def test_original_names_unchanged(self):
        assert DEVICES["h100-l2"] == 50 * 2**20 and DEVICES["h200-l2"] == 60 * 2**20
        assert DEVICES["a100-l2"] == 40 * 2**20 and DEVICES["h200-hbm"] == 141 * 10**9

    @pytest.mark.parametrize("name, expected", [
        ("mi300x-llc", 256 * 2**20), ("mi300x-infinity-cache", 256 * 2**20), ("l40s-gddr", 48 * 10**9),
        ("rtx4090-l2", 72 * 2**20), ("b200-hbm", 180 * 10**9), ("groq-lpu-sram", 230 * 10**6),
        ("wse-3-sram", 44 * 10**9), ("h20-hbm", 96 * 10**9),
    ])
    def test_new_names_parse(self, name, expected):
        assert parse_capacity(name) == expected

    def test_every_capacity_name_maps_to_its_device(self):
        for name, size in DEVICES.items():
            device = get_device(name)
            assert size in (device.on_chip_bytes, device.memory_bytes)

    def test_b200_l2_not_invented(self):
        assert get_device("b200").on_chip_bytes is None
        assert "b200-l2" not in DEVICES


class TestGetDevice:
    def test_case_and_passthrough(self):
        assert get_device(" H100 ").name == "h100"
        device = get_device("a100")
        assert get_device(device) is device
        assert isinstance(device, Device)

    def test_unknown_names_presets(self):
        with pytest.raises(InputError, match=r"^`device` must be one of h100, h200, a100, b200, .*got 'tpu'$"):
            get_device("tpu")
