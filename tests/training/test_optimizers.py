import pytest
import torch

from batchfit.errors import ConfigError
from batchfit.training.optimizers import OPTIMIZERS, make_optimizer, optimizer_family


@pytest.mark.parametrize(
    "name, class_name",
    [("sgd", "SGD"), ("adam", "Adam"), ("adamw", "AdamW"), ("lars", "LARS"), ("lamb", "Lamb")],
)
def test_each_name_builds_its_optimizer_at_the_rate(name, class_name):
    optimizer = make_optimizer(name, torch.nn.Linear(2, 1).parameters(), 0.01, task=None)
    assert type(optimizer).__name__ == class_name
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_task_uses_the_tasks_factory(mlp_task):
    optimizer = make_optimizer("task", torch.nn.Linear(2, 1).parameters(), 0.3, task=mlp_task)
    assert type(optimizer).__name__ == "SGD" and optimizer.param_groups[0]["lr"] == 0.3


def test_families(mlp_task):
    assert [optimizer_family(n, mlp_task) for n in OPTIMIZERS] == [
        "sgd", "sgd", "adam", "adam", "sgd", "adam"
    ]  # fmt: skip


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="lars, lamb"):
        make_optimizer("adagrad", [], 0.1, task=None)


def test_lars_without_pytorch_optimizer_names_the_extra(monkeypatch):
    import sys

    from batchfit.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import now fails
    with pytest.raises(MissingDependencyError, match=r"batchfit\[optimizers\]"):
        make_optimizer("lars", torch.nn.Linear(2, 1).parameters(), 0.1, task=None)
