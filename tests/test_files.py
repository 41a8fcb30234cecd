"""The one atomic writer: whole files, readable by other users, nothing left behind on failure."""

import os
import stat

import pytest

from exporters.device.files import write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_makes_files_0644_and_folders_0755_whatever_mkstemp_does(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "a" / "b" / "report.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert _mode(path) == 0o644
    assert _mode(tmp_path / "a") == 0o755 and _mode(tmp_path / "a" / "b") == 0o755
    assert write_atomic(tmp_path / "key", b"x", mode=0o600) and _mode(tmp_path / "key") == 0o600


def test_write_atomic_replaces_whole_and_leaves_no_temporary_file_on_failure(tmp_path):
    target = tmp_path / "model.onnx"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # not bytes: the write fails after the temporary file exists
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
