"""Device names (case-insensitive) and honest sources (reviewer D10)."""

import pytest

from cachefit import InputError


def test_device_names_are_case_insensitive_and_unknown_ones_listed():
    from cachefit.devices import get_device

    assert get_device("H100-L2").name == "h100" and get_device("WSE-3").name == "wse-3"
    with pytest.raises(InputError, match=r"^`device` must be one of h100, h200, a100, .*wse-3"):
        get_device("h300")


def test_no_circular_or_mislabelled_sources():
    """Reviewer D10: h200's L2 cited cachefit's own table; wse-3's sparse 'AI' figure sat under dense BF16."""
    from cachefit.devices import DEVICES, PRESETS

    h200 = PRESETS["h200"]
    assert "cachefit" not in h200.sources["on_chip_bytes"].replace("`h200-l2`", "")
    assert "not published for the H200" in h200.sources["on_chip_bytes"]
    assert "50 MiB" in h200.notes and DEVICES["h200-l2"] == 60 * 2**20  # the contract's name keeps 60 MiB
    assert PRESETS["wse-3"].sources["peak_flops"].startswith("dense BF16 not published")
