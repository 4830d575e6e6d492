import pytest

from cachefit import InputError, format_bytes, parse_bytes, parse_capacity
from cachefit.devices import DEVICES


class TestParseBytes:
    @pytest.mark.parametrize("text, expected", [
        ("50MiB", 50 * 2**20), ("50MB", 50 * 10**6), ("1.5GiB", 3 * 2**29), ("64KiB", 65536),
        ("4096", 4096), (" 2 kB ", 2000), ("2KB", 2000), ("3miB", 3 * 2**20), ("3MIB", 3 * 2**20), ("1e3B", 1000), (123, 123), (0, 0), ("3TB", 3 * 10**12),
    ])
    def test_accepted_forms(self, text, expected):
        assert parse_bytes(text) == expected

    @pytest.mark.parametrize("bad", ["fifty", "-3MB", "", "12 parsecs", "MB", "1.2.3MB"])
    def test_bad_strings_name_argument_and_forms(self, bad):
        with pytest.raises(InputError, match=r"`capacity` must be an int of bytes or a string such as '50MiB'"):
            parse_bytes(bad)

    @pytest.mark.parametrize("bits, spelled", [("50Mb", "'MB' or 'MiB'"), ("2 kb", "'KB' or 'KiB'"),
                                               ("1Gib", "'GB' or 'GiB'"), ("8b", "'B'"), ("3tb", "'TB' or 'TiB'")])
    def test_lower_case_b_is_bits_and_refused(self, bits, spelled):
        """Reviewer D10: '50Mb' (megabits) was read as 50 MB."""
        with pytest.raises(InputError, match=rf"^`capacity` must be bytes, spelled with an upper-case B \({spelled}\), "
                                             rf"got '{bits}': a lower-case 'b' means bits$"):
            parse_bytes(bits)

    def test_overflow(self):
        with pytest.raises(InputError, match=r"`capacity` is too large to be a number of bytes, got '1e400'"):
            parse_bytes("1e400")

    @pytest.mark.parametrize("huge", ["1e1000000", "1e999999999999", "9" * 5000, "1" + "0" * 25 + "PiB"])
    def test_huge_exponents_and_digits_refused_without_decimal_overflow(self, huge):
        # issue 10: '1e1000000' raised decimal.Overflow (a traceback)
        with pytest.raises(InputError, match=r"`capacity` is too large to be a number of bytes"):
            parse_bytes(huge)

    @pytest.mark.parametrize("tiny", ["1e-1000000", "0." + "0" * 30 + "1PiB", "1." + "0" * 100 + "1"])
    def test_tiny_or_overlong_fractions_refused(self, tiny):
        with pytest.raises(InputError, match=r"`capacity` must be a whole number of bytes"):
            parse_bytes(tiny)

    def test_exact_at_many_digits(self):
        assert parse_bytes("0.5MiB") == 2**19 and parse_bytes("1." + "0" * 100) == 1
        assert parse_bytes("1e24") == 10**24

    def test_long_input_shortened_in_message(self):
        with pytest.raises(InputError, match=r"got 'x{39}… \(10000 characters\)"):
            parse_bytes("x" * 10000)

    def test_fractional_bytes_refused(self):
        with pytest.raises(InputError, match=r"`size` must be a whole number of bytes, got '0.3KiB' = 307.2 B"):
            parse_bytes("0.3KiB", name="size")

    @pytest.mark.parametrize("bad", [True, None, [1], -5, float("nan"), 2.5])
    def test_bad_types(self, bad):
        with pytest.raises(InputError, match="`capacity`"):
            parse_bytes(bad)

    def test_is_value_error(self):
        with pytest.raises(ValueError):
            parse_bytes("fifty")


class TestParseCapacity:
    def test_devices(self):
        assert parse_capacity("h100-l2") == 50 * 2**20
        assert parse_capacity("H200-L2") == 60 * 2**20
        assert parse_capacity(" H100-L2 ") == parse_capacity("h100-l2")

    def test_unknown_name_lists_the_known_ones(self):
        with pytest.raises(InputError, match=r"or a device name: h100-l2, h200-l2, a100-l2, .*wse-3-sram"):
            parse_capacity("h100-l3")
        assert parse_capacity("a100-l2") == 40 * 2**20
        assert parse_capacity("h100-hbm") == 80 * 10**9
        assert parse_capacity("h200-hbm") == 141 * 10**9
        assert parse_capacity("a100-hbm") == 80 * 10**9
        assert list(DEVICES)[:6] == ["h100-l2", "h200-l2", "a100-l2", "h100-hbm", "h200-hbm", "a100-hbm"]

    @pytest.mark.parametrize("bad", ["fifty", "-3MB", "1e400", ""])
    def test_bad_strings_list_devices(self, bad):
        with pytest.raises(InputError, match=r"`capacity`.*or a device name: h100-l2, h200-l2"):
            parse_capacity(bad)

    def test_zero_refused(self):
        with pytest.raises(InputError, match=r"`capacity` must be a positive number of bytes, got 0"):
            parse_capacity(0)


class TestFormatBytes:
    @pytest.mark.parametrize("value, binary, text", [
        (0, True, "0 B"), (1023, True, "1023 B"), (1024, True, "1.0 KiB"), (50 * 2**20, True, "50.0 MiB"),
        (50 * 10**6, False, "50.0 MB"), (141 * 10**9, False, "141.0 GB"), (3 * 2**50, True, "3.0 PiB"),
    ])
    def test_format(self, value, binary, text):
        assert format_bytes(value, binary=binary) == text
