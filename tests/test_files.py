import json
import os
import stat

import pytest

from batchfit.errors import ConfigError
from batchfit.files import FILE_MODE, folder_lock, json_text, open_append, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_write_atomic_writes_text_bytes_and_streams_with_the_shared_mode(tmp_path, umask_022):
    path = write_atomic(tmp_path / "deep" / "a.txt", "hello")
    assert path.read_text() == "hello"
    assert _mode(path) == 0o644
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, lambda stream: stream.write(b"streamed"))
    assert path.read_bytes() == b"streamed"
    assert _mode(path) == FILE_MODE == 0o644


def test_the_umask_applies_to_every_writer_alike(tmp_path):
    previous = os.umask(0o077)
    try:
        whole = write_atomic(tmp_path / "whole.json", "{}")
        with open_append(tmp_path / "log.jsonl") as stream:
            stream.write("{}\n")
    finally:
        os.umask(previous)
    assert _mode(whole) == _mode(tmp_path / "log.jsonl") == 0o600


def test_interrupted_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "plan.json", "old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_writer_interrupted_mid_write_leaves_no_partial_file(tmp_path):
    def half_then_interrupted(stream):
        stream.write(b"half of a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "checkpoint.pt", half_then_interrupted)
    assert list(tmp_path.iterdir()) == []


def test_open_append_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for line in ("a\n", "b\n"):
        with open_append(path) as stream:
            stream.write(line)
    assert path.read_text() == "a\nb\n"


class _InterruptedStream:
    """A binary stream whose `writes`-th write is interrupted (a Ctrl-C arriving mid-write)."""

    def __init__(self, stream, writes):
        self.stream, self.left = stream, writes

    def write(self, data):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.stream.write(data)

    def flush(self):
        self.stream.flush()


def test_ctrl_c_inside_torch_save_is_reported_as_the_interrupt(tmp_path):
    # torch.save's zip writer, unwinding the interrupt, raised RuntimeError ("unexpected pos"),
    # which hid the Ctrl-C: the CLI showed a traceback and exit 1 instead of exit 130.
    import torch

    path = write_atomic(tmp_path / "checkpoint.pt", b"the previous checkpoint")
    state = {"model": {"w": torch.ones(1000)}, "step": 3}
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, lambda stream: torch.save(state, _InterruptedStream(stream, 3)))
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_other_writer_errors_pass_through_unchanged(tmp_path):
    def broken(stream):
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        write_atomic(tmp_path / "a.json", broken)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_folder_is_held_by_one_writer_at_a_time(tmp_path):
    run = tmp_path / "run"
    with folder_lock(run, what="a training run") as held:
        assert held == run and run.is_dir()
        # a second holder (its own descriptor, as another process would have) is refused
        with pytest.raises(ConfigError, match=r"in use: another process is writing a batchfit run"):
            with folder_lock(run):
                pass
        (run / "metrics.jsonl").write_text("{}\n")
    with folder_lock(run):  # released on the way out
        pass
    assert (run / "metrics.jsonl").exists()


def test_a_folder_made_for_the_lock_goes_again_while_empty(tmp_path):
    made = tmp_path / "a" / "b"
    with folder_lock(made):
        pass
    assert not made.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with folder_lock(kept):
        pass
    assert kept.is_dir()  # it was there before: never removed


def test_json_text_is_strict_json_with_non_finite_numbers_as_null():
    class Boxed:
        def to_dict(self):
            return {"peak": float("-inf")}

    text = json_text({"a": (float("nan"), 2.5), "b": Boxed()}, default=lambda v: v.to_dict())
    assert json.loads(text, parse_constant=pytest.fail) == {"a": [None, 2.5], "b": {"peak": None}}
