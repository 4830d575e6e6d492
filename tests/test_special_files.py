"""Writers never replace a device, FIFO or folder: renaming over one would replace it (found on /dev/full)."""

import os

import pytest
from click.testing import CliRunner

from cachefit.cli import main
from cachefit.result import write_text_atomic


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


class TestWriteTextAtomic:
    def test_fifo_is_refused_and_kept(self, fifo):
        with pytest.raises(OSError, match="exists and is not an ordinary file"):
            write_text_atomic(fifo, "text")
        assert fifo.is_fifo()
        assert sorted(p.name for p in fifo.parent.iterdir()) == ["fifo"]  # no temporary file left

    def test_folder_is_refused(self, tmp_path):
        with pytest.raises(OSError, match="exists and is not an ordinary file"):
            write_text_atomic(tmp_path, "text")

    def test_bytes_are_written(self, tmp_path):
        write_text_atomic(tmp_path / "b.bin", b"\x00\x01")
        assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


class TestCliOutputs:
    @pytest.mark.parametrize("option, name", [("--json", "--json"), ("--dot", "--dot")])
    def test_fifo_target_is_one_line_exit_2(self, fifo, option, name):
        result = CliRunner().invoke(main, ["plan", "gpt2", "-c", "1GB", option, str(fifo)])
        assert result.exit_code == 2
        assert f"`{name}`" in result.output and "not an ordinary file" in result.output
        assert fifo.is_fifo()

    def test_plot_fifo_is_one_line_exit_2(self, fifo):
        target = fifo.with_suffix(".png")
        os.rename(fifo, target)
        result = CliRunner().invoke(main, ["plan", "gpt2", "-c", "1GB", "--plot", str(target)])
        assert result.exit_code == 2
        assert "`--plot`" in result.output and "not an ordinary file" in result.output
        assert target.is_fifo()

    @pytest.mark.parametrize("name", ["x.bmpx", "x.gif", "noext"])
    def test_plot_suffix_checked_before_planning(self, tmp_path, name):
        result = CliRunner().invoke(main, ["plan", "gpt2", "-c", "1GB", "--plot", str(tmp_path / name)])
        assert result.exit_code == 2
        assert "must end in .png, .svg or .pdf" in result.output
        assert "group(s)" not in result.output  # refused before the solve
        assert list(tmp_path.iterdir()) == []
