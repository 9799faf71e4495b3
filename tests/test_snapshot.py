import random

import numpy
import torch

from batchfit.snapshot import capture_rng, preserved, restore_rng
from tests.conftest import make_bn_convnet


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
