import pytest
import torch

from batchfit.errors import CheckpointError
from batchfit.training.checkpoint import (
    content_digest,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "step": 1, "fingerprint": "abc"}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", _state(1.0))
    state = load_checkpoint(tmp_path / "run", fingerprint="abc")
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["step"] == 1
    assert path.name == "checkpoint.pt"


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1.0))
    before = path.read_bytes()

    def crash(obj, stream):
        stream.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_a_pickled_object_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format_version": 1, "model": {}, "evil": object()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_other_model_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", _state(1.0))
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(tmp_path, fingerprint="xyz")


def test_not_a_batchfit_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a batchfit"):
        load_checkpoint(tmp_path)


def test_fingerprint_depends_on_architecture_not_values():
    one, two = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    assert model_fingerprint(one) == model_fingerprint(two)
    assert model_fingerprint(one) != model_fingerprint(torch.nn.Linear(3, 3))


def test_a_changed_value_fails_the_checksum_and_an_old_format_still_loads(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state(1.0))
    state = torch.load(path, weights_only=True)
    assert len(state["sha256"]) == 64
    state["step"] = 2  # as if a byte of the pickled step had flipped
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
    torch.save({"format_version": 1, **_state(1.0)}, path)  # written before checksums
    assert load_checkpoint(path)["step"] == 1


def test_content_digest_sees_dtype_shape_and_keys():
    base = content_digest({"w": torch.zeros(4)})
    assert base == content_digest({"w": torch.zeros(4)})
    assert base != content_digest({"w": torch.zeros(4, dtype=torch.float64)})
    assert base != content_digest({"w": torch.zeros(2, 2)})
    assert base != content_digest({"v": torch.zeros(4)})


def test_the_generators_saved_and_restored_include_a_cuda_devices_own(monkeypatch):
    # Dropout on a GPU draws from the device's generator: a checkpoint of a CUDA run keeps it
    # beside the CPU's, so that a resumed run draws what an uninterrupted one would.
    import torch

    from batchfit.training.setup import generator_states, restore_generators

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, 7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    cpu, cuda = generator_states(torch.device("cuda", 1))
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.tensor([7, 7]))
    assert generator_states(torch.device("cpu"))[1] is None
    checkpoint = {"rng": [cpu, cpu], "cuda_rng": [torch.tensor([1]), torch.tensor([2])]}
    restore_generators(checkpoint, 1, torch.device("cuda", 1))
    assert [(s.tolist(), d) for s, d in calls] == [([2], torch.device("cuda", 1))]
    restore_generators(checkpoint, 0, torch.device("cpu"))  # a CPU run leaves CUDA alone
    restore_generators({"rng": [cpu]}, 0, torch.device("cuda", 0))  # an older checkpoint
    assert len(calls) == 1
