"""Bad library calls refused in one line: Task values it cannot use, an lr_range_test optimizer
over another model, plan margins, and BatchNorm models never tried at batch 1."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from batchfit.errors import CheckpointError, ConfigError, TaskError
from batchfit.plan.norm_layers import is_single_sample_batchnorm_error, smallest_batch
from tests.conftest import make_bn1d_task, make_mlp, make_mlp_task


class _Stream(IterableDataset):
    def __iter__(self):
        return iter([])


# (field, value, words of the fix)
BAD_TASK_VALUES = [
    ("lr", 0, "give the learning rate"),
    ("lr", -0.1, "give the learning rate"),
    ("lr", math.nan, "give the learning rate"),
    ("lr", math.inf, "give the learning rate"),
    ("lr", True, "give the learning rate"),
    ("lr", "0.1", "give the learning rate"),
    ("batch_size", 0, "give the batch size"),
    ("batch_size", 8.0, "give the batch size"),
    ("batch_size", True, "give the batch size"),
    ("model", "resnet", "nn.Module or a function"),
    ("loss", None, "loss(model, batch)"),
    ("optimizer", "sgd", "optimizer(params, lr)"),
    ("metric", 0.5, "give a function, or None"),
    ("collate", [], "give a function, or None"),
    ("train_data", [], "holds no samples"),
    ("train_data", "abc", "map-style Dataset"),
    ("train_data", {"x": 1}, "map-style Dataset"),
    ("train_data", _Stream(), "map-style Dataset"),
    ("val_data", TensorDataset(torch.zeros(0, 8)), "holds no samples"),
    ("name", "", "non-empty name"),
    ("seed", -1, "whole number in [0, "),
    ("seed", 2**64, "whole number in [0, "),
    ("kind", "vision", "use one of"),
]


@pytest.mark.parametrize("field, value, words", BAD_TASK_VALUES)
def test_task_refuses_values_it_cannot_use(field, value, words):
    with pytest.raises(TaskError, match=f"Task.{field} is ") as info:
        make_mlp_task(**{field: value})
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_lr_range_test_refuses_an_optimizer_over_another_models_parameters(mlp_task):
    from batchfit.lr.range_test import lr_range_test

    model, other = make_mlp(), make_mlp()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"holds 4 of 4 parameter\(s\) that are not the model"):
        lr_range_test(
            model, optimizer, loss=lambda m, b: m(b[0]).sum(), train_data=mlp_task.train_data
        )


@pytest.mark.parametrize("margin", [1, -1, math.nan, 1.5])
def test_plan_refuses_a_bad_margin_even_without_a_budget(margin, monkeypatch):
    import batchfit.plan.planner as planner

    def no_work(*args, **kwargs):
        raise AssertionError("measured before the margin was checked")

    monkeypatch.setattr(planner, "memory_limit", no_work)
    with pytest.raises(ConfigError, match="margin must"):
        planner.plan(make_mlp_task(), device="cpu", margin=margin)


def test_batchnorm_models_start_at_batch_2():
    task = make_bn1d_task()
    assert smallest_batch(task.make_model()) == 2 and smallest_batch(make_mlp()) == 1
    model = task.make_model()
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, 8))
    assert is_single_sample_batchnorm_error(info.value)
    assert not is_single_sample_batchnorm_error(ValueError("something else"))


def test_throughput_skips_batch_1_of_a_batchnorm_model_and_refuses_it_alone():
    from batchfit.throughput.measure import measure_throughput

    task = make_bn1d_task()
    result = measure_throughput(task, max_batch_size=8, repeats=1, min_seconds=0, device="cpu")
    assert result.batch_sizes == (2, 4, 8)
    with pytest.raises(ConfigError, match="measure batch sizes from 2"):
        measure_throughput(task, batch_sizes=[1], repeats=1, device="cpu")


def test_plan_of_a_batchnorm1d_model_and_its_fingerprint():
    from batchfit.plan.plan_file import check_plan_task, model_identity
    from batchfit.plan.planner import plan

    task = make_bn1d_task()
    result = plan(task, device="cpu", noise_batches=4, range_test_steps=40)
    assert result.micro_batch >= 2 and 1 not in result.measurements["throughput"]["batch_sizes"]
    assert result.task_name == "bn1d"
    assert result.model_fingerprint == model_identity(task.make_model())["model_fingerprint"]
    assert result.model_parameters == sum(p.numel() for p in task.make_model().parameters())
    assert result.train_samples == len(task.train_data)
    check_plan_task(result, task)  # its own task passes
    # "task": the default name a task loaded from a file had before it was named after the file
    check_plan_task(replace(result, task_name="task"), task)
    with pytest.raises(CheckpointError, match="made for task 'other'"):
        check_plan_task(replace(result, task_name="other"), task)
