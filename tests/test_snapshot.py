import random

import numpy
import pytest
import torch

from batchfit.snapshot import capture_rng, preserved, preserved_rng, restore_rng
from tests.conftest import classification_loss, make_bn_convnet, make_mlp_task


def test_rng_round_trip():
    state = capture_rng()
    first = (random.random(), numpy.random.rand(), torch.rand(1))
    restore_rng(state)
    second = (random.random(), numpy.random.rand(), torch.rand(1))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_preserved_restores_model_optimizer_and_flags():
    model = make_bn_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.randn(4, 1, 8, 8)
    model(inputs).sum().backward()
    optimizer.step()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    momentum = optimizer.state[model[0].weight]["momentum_buffer"].clone()
    model.eval()
    with preserved(model, optimizer):
        model.train()
        for _ in range(3):
            model(inputs).sum().backward()
            optimizer.step()
        optimizer.param_groups[0]["lr"] = 5.0
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"])
    assert torch.equal(optimizer.state[model[0].weight]["momentum_buffer"], momentum)
    assert optimizer.param_groups[0]["lr"] == 0.1 and not model.training


def _drawing_task():
    """A tiny task whose loss draws from Python's, NumPy's and torch's global generators."""

    def loss(model, batch):
        random.random(), numpy.random.rand(), torch.rand(1)
        return classification_loss(model, batch)

    return make_mlp_task(samples=64, loss=loss, batch_size=8)


def _rng_fingerprint():
    return random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state()


def _guarded_calls():
    from batchfit.lr.range_test import lr_range_test
    from batchfit.memory.predict import predict_step_memory
    from batchfit.memory.search import find_max_batch_size
    from batchfit.memory.step import measure_step_memory
    from batchfit.noise.measure import measure_noise_scale
    from batchfit.throughput.measure import measure_throughput
    from batchfit.training.config import TrainConfig
    from batchfit.training.loop import train

    def drawing_step(batch_size):
        numpy.random.rand(), random.random(), torch.rand(1)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    return {
        "find_max_batch_size(step)": lambda: find_max_batch_size(
            drawing_step, device="cpu", memory_budget="1GiB", max_batch_size=64
        ),
        "find_max_batch_size(task)": lambda: find_max_batch_size(
            _drawing_task(), device="cpu", memory_budget="64MiB", max_batch_size=64
        ),
        "measure_step_memory": lambda: measure_step_memory(_drawing_task(), 4),
        "predict_step_memory": lambda: predict_step_memory(_drawing_task(), 4, device="cpu"),
        "lr_range_test": lambda: lr_range_test(
            _drawing_task(), steps=10, smoothing=0.2, device="cpu"
        ),
        "measure_throughput": lambda: measure_throughput(
            _drawing_task(), batch_sizes=[4], warmup_steps=0, repeats=1, device="cpu"
        ),
        "measure_noise_scale": lambda: measure_noise_scale(
            _drawing_task(), batches=2, warmup_steps=1, device="cpu"
        ),
        "train": lambda: train(
            _drawing_task(), TrainConfig(global_batch=8, micro_batch=8, steps=2), device="cpu"
        ),
    }


@pytest.mark.parametrize("name", sorted(_guarded_calls()))
def test_every_guarded_function_restores_python_numpy_and_torch_generators(name):
    random.seed(3), numpy.random.seed(3), torch.manual_seed(3)
    before = _rng_fingerprint()
    _guarded_calls()[name]()
    after = _rng_fingerprint()
    assert after[0] == before[0], "Python's random"
    assert after[1] == before[1], "NumPy's global generator"
    assert torch.equal(after[2], before[2]), "torch's CPU generator"


def test_preserved_rng_seeds_torch_inside_and_restores_after_an_error():
    torch.manual_seed(1)
    before = _rng_fingerprint()
    with pytest.raises(KeyError), preserved_rng(seed=0):
        inside = torch.rand(1)
        numpy.random.rand()
        raise KeyError
    torch.manual_seed(0)
    assert torch.equal(inside, torch.rand(1))
    torch.set_rng_state(before[2])
    after = _rng_fingerprint()
    assert after[1] == before[1] and torch.equal(after[2], before[2])
