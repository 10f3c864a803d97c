import os

import pytest

from asc_dist import atomic


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    atomic.write_text(target, "old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failed_replace_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    atomic.write_bytes(target, b"step_3.pt\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_bytes(target, b"step_6.pt\n")
    assert target.read_bytes() == b"step_3.pt\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
