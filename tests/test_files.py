import os

import pytest

from batchfit.files import write_atomic


def test_write_atomic_writes_text_and_bytes_with_normal_permissions(tmp_path):
    path = write_atomic(tmp_path / "deep" / "a.txt", "hello")
    assert path.read_text() == "hello"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "plan.json", "old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
