import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import TensorDataset

from batchfit.training.evaluation import evaluate, update_swa_batchnorm
from tests.conftest import accuracy, classification_loss, make_bn_convnet, make_mlp_task


def test_evaluate_is_the_sample_weighted_mean_and_restores_modes():
    task = make_mlp_task()  # 64 validation samples
    model = task.make_model()
    model.train()
    uneven = evaluate(model, task, batch_size=24)  # batches of 24, 24, 16
    inputs, labels = task.val_data.tensors
    assert abs(uneven["val_loss"] - classification_loss(model, (inputs, labels)).item()) < 1e-6
    assert abs(uneven["val_accuracy"] - accuracy(model, (inputs, labels))) < 1e-6
    assert model.training


def test_evaluate_on_the_first_samples_only():
    task = make_mlp_task()
    model = task.make_model().eval()
    first = evaluate(model, task, batch_size=8, max_samples=20)  # batches of 8, 8, 4
    inputs, labels = task.val_data.tensors
    expected = classification_loss(model, (inputs[:20], labels[:20])).item()
    assert abs(first["val_loss"] - expected) < 1e-6
    assert evaluate(model, task, max_samples=10_000) == evaluate(model, task)


def test_evaluate_without_validation_data_is_empty():
    assert evaluate(torch.nn.Linear(8, 3), make_mlp_task(val_data=None)) == {}


def test_update_swa_batchnorm_recomputes_statistics_over_the_training_data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 1, 8, 8, generator=generator) * 3 + 2
    task = make_mlp_task(
        model=make_bn_convnet, train_data=TensorDataset(inputs, torch.zeros(40, dtype=torch.long))
    )
    swa = AveragedModel(task.make_model())
    update_swa_batchnorm(swa, task, device="cpu", batch_size=20, loss=task.loss)
    batchnorm = swa.module[1]
    with torch.no_grad():
        features = swa.module[0](inputs)
    assert torch.allclose(batchnorm.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    # update_bn averages batch means (momentum None): with equal batches, the data mean.
    assert int(batchnorm.num_batches_tracked) == 2
