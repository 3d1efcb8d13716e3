"""Atomic result files: complete or absent, readable by others, no temporary left behind."""

import stat

import numpy as np
import pytest

from dprdm.files import save_npy_atomically, write_bytes_atomically


def test_write_replaces_the_file_with_mode_644_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_bytes(b"old")
    write_bytes_atomically(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_bytes_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_save_npy_round_trips(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_npy_atomically(tmp_path / "a.npy", array)
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
