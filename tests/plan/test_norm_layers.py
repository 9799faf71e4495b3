import pytest
import torch
from torch import nn

from batchfit.errors import ConfigError
from batchfit.plan.norm_layers import batchnorm_advice, convert_batchnorm, find_batchnorm_layers
from tests.conftest import make_bn_convnet, make_mlp


def test_find_batchnorm_layers():
    layers = find_batchnorm_layers(make_bn_convnet())
    assert [(layer.name, layer.kind, layer.num_features) for layer in layers] == [
        ("1", "BatchNorm2d", 4)
    ]
    assert find_batchnorm_layers(make_mlp()) == []


def test_advice_by_samples_per_call():
    model = make_bn_convnet()
    assert batchnorm_advice(make_mlp(), 4) is None
    assert batchnorm_advice(model, 32).action == "keep"
    assert batchnorm_advice(model, 8, world_size=4).action == "syncbatchnorm"
    advice = batchnorm_advice(model, 8, world_size=2)
    assert advice.action == "groupnorm"
    assert "8 samples" in advice.reason and "32" in advice.reason
    with pytest.raises(ConfigError):
        batchnorm_advice(model, 0)


def test_convert_to_groupnorm_carries_affine_weights_and_leaves_original():
    model = make_bn_convnet()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    conversion = convert_batchnorm(model, to="groupnorm", groups=2)
    new = conversion.model[1]
    assert isinstance(new, nn.GroupNorm) and new.num_groups == 2
    assert torch.equal(new.weight, model[1].weight)
    assert isinstance(model[1], nn.BatchNorm2d)  # the given model is untouched
    assert "running statistics dropped" in conversion.changes[0]
    output = conversion.model(torch.randn(1, 1, 8, 8))  # works with a batch of one
    assert output.shape == (1, 3)


def test_convert_groups_divide_channels():
    model = nn.Sequential(nn.Conv2d(1, 12, 1), nn.BatchNorm2d(12))
    assert convert_batchnorm(model, to="groupnorm").model[1].num_groups == 12
    model = nn.Sequential(nn.Conv2d(1, 48, 1), nn.BatchNorm2d(48))
    assert convert_batchnorm(model, to="groupnorm").model[1].num_groups == 24


def test_a_batchnorm1d_on_features_becomes_one_group_that_still_carries_the_input():
    # An MLP's BatchNorm1d sees (N, C): GroupNorm(C, C) there normalised one number per group
    # and put out its bias alone, a layer that passes nothing of its input on.
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    conversion = convert_batchnorm(model, to="groupnorm")
    new = conversion.model[1]
    assert isinstance(new, nn.GroupNorm) and new.num_groups == 1
    assert "GroupNorm(1 groups)" in conversion.changes[0]
    hidden = new(conversion.model[0](torch.randn(16, 4)))
    assert hidden.std(dim=1).min() > 0.5  # each sample's features normalised, not zeroed
    expected = nn.functional.layer_norm(conversion.model[0](torch.ones(2, 4)), (8,))
    assert torch.allclose(new(conversion.model[0](torch.ones(2, 4))), expected, atol=1e-5)


def test_convert_to_syncbatchnorm():
    conversion = convert_batchnorm(make_bn_convnet(), to="syncbatchnorm")
    assert isinstance(conversion.model[1], nn.SyncBatchNorm)
    assert len(conversion.changes) == 1


def test_convert_unknown_target():
    with pytest.raises(ConfigError, match="groupnorm"):
        convert_batchnorm(make_bn_convnet(), to="layernorm")
