import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from batchfit.errors import ConfigError
from batchfit.range_test import lr_range_test
from batchfit.range_test_plot import plot_range_test


def _result(end_lr):
    model = torch.nn.Linear(3, 1)
    data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    return lr_range_test(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        loss=lambda m, b: F.mse_loss(m(b[0]), b[1]), train_data=data, global_batch=8,
        steps=20, smoothing=0.3, start_lr=1e-3, end_lr=end_lr,
    )  # fmt: skip


@pytest.mark.parametrize("end_lr", [1.0, 1e4])  # completed, and diverged
def test_writes_a_png(tmp_path, end_lr):
    path = plot_range_test(_result(end_lr), tmp_path / "lr.png", title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [path]


def test_rejects_other_suffixes(tmp_path):
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_range_test(_result(1.0), tmp_path / "lr.pdf")
