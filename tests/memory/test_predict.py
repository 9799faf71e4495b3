"""Tests for batchfit.memory.predict: fake-tensor prediction equals the measured count exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchfit.errors import ConfigError
from batchfit.memory.predict import (
    fit_predicted_memory_model,
    predict_memory_model,
    predict_step_memory,
    range_batch_sizes,
)
from batchfit.memory.step import measure_step_memory
from batchfit.task import load_example
from tests.conftest import TokenModel, make_bn_convnet, make_mlp_task

EXAMPLE_BATCHES = {
    "digits": (1, 17, 64),
    "cnn": (1, 9, 24),
    "unet": (1, 3, 8),
    "charlm": (1, 6, 20),
}


@pytest.fixture(scope="module")
def examples():
    return {name: load_example(name) for name in EXAMPLE_BATCHES}


@pytest.mark.parametrize(
    ("name", "batch_size"),
    [(name, size) for name, sizes in EXAMPLE_BATCHES.items() for size in sizes],
)
def test_prediction_equals_measurement_on_every_example(examples, name, batch_size):
    task = examples[name]
    predicted = predict_step_memory(task, batch_size)
    measured = measure_step_memory(task, batch_size)
    assert predicted.method == "fake" and predicted.fallback_reason is None
    assert predicted.peak_bytes == measured.peak_bytes
    assert predicted.state_bytes == measured.state_bytes
    assert predicted.batch_bytes == measured.batch_bytes


def test_prediction_of_a_given_module_and_of_a_bn_convnet():
    # A task holding a module (not a factory) is fake-copied; BatchNorm buffers count too.
    model = make_bn_convnet()
    inputs = torch.randn(40, 1, 8, 8)
    labels = torch.randint(3, (40,))
    task = make_mlp_task(
        model=model,
        train_data=torch.utils.data.TensorDataset(inputs, labels),
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
    )
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for batch_size in (2, 33):
        assert (
            predict_step_memory(task, batch_size).peak_bytes
            == measure_step_memory(task, batch_size).peak_bytes
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def _storage(nbytes: int) -> int:
    return -(-nbytes // 512) * 512  # the counter rounds each storage up to 512 bytes


@pytest.mark.parametrize("convert", ["bf16", "half"])
def test_a_factory_that_converts_its_model_is_predicted_with_fake_tensors(convert):
    # `.to(torch.bfloat16)` or `.half()` inside fake mode failed ("_apply(): Couldn't swap
    # Linear.weight"): the prediction fell back to a real step, and a card's could not be had.
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 8)
            self.norm = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 12)
            self.head.weight = self.embed.weight  # tied: one parameter, counted once

        def forward(self, tokens):
            return self.head(self.norm(self.embed(tokens)))

    def model():
        built = Tied()
        return built.to(torch.bfloat16) if convert == "bf16" else built.half()

    task = make_mlp_task(
        model=model,
        train_data=torch.utils.data.TensorDataset(torch.randint(0, 12, (32,))),
        loss=lambda m, batch: F.cross_entropy(m(batch[0]).float(), batch[0]),
    )
    for batch_size in (2, 30):
        predicted = predict_step_memory(task, batch_size)
        assert predicted.method == "fake", predicted.fallback_reason
        measured = measure_step_memory(task, batch_size)
        assert predicted.peak_bytes == measured.peak_bytes
        assert predicted.state_bytes == measured.state_bytes


def test_a_factory_that_deep_copies_layers_is_predicted_exactly():
    # nn.TransformerEncoder deep-copies its layer; inside fake mode that copied the fake mode
    # too, ops converted the copies' parameters afresh, and the prediction was 64 KiB above
    # the count (482,304 against 416,768 bytes here).
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 4 * 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 3)

        def forward(self, inputs):
            tokens = self.embed(inputs).view(inputs.shape[0], 4, 32)
            return self.head(self.encoder(tokens).mean(1))

    task = make_mlp_task(
        model=Encoder, optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr)
    )
    predicted = predict_step_memory(task, 7)
    assert predicted.method == "fake"
    assert predicted.peak_bytes == measure_step_memory(task, 7).peak_bytes


@pytest.mark.parametrize("batch_size", [256, 1000])
def test_prediction_and_measurement_equal_an_account_by_hand(batch_size):
    # An independent check of both counts: an MLP 32 -> 64 -> 10 with Adam, float32.
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    task = make_mlp_task(
        model=model,
        train_data=torch.utils.data.TensorDataset(torch.randn(64, 32), torch.randint(10, (64,))),
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
    )
    first, second = (
        _storage(4 * 32 * 64) + _storage(4 * 64),
        _storage(4 * 64 * 10) + _storage(4 * 10),
    )
    params = first + second
    steps = 4 * _storage(4)  # Adam's step count: one float32 scalar per parameter
    state = 4 * params + steps  # parameters, gradients, exp_avg, exp_avg_sq
    batch = _storage(4 * batch_size * 32) + _storage(8 * batch_size)  # inputs, int64 labels
    hidden = _storage(4 * batch_size * 64)
    # The peak is in ReLU's backward: parameters and Adam's state, the second layer's gradients
    # (the first's are not made yet: zero_grad set them to None), the batch, the saved ReLU
    # output with the gradient coming in and the one going out, and the loss with its gradient.
    peak = 3 * params + steps + second + batch + 3 * hidden + 2 * 512
    predicted = predict_step_memory(task, batch_size)
    measured = measure_step_memory(task, batch_size)
    assert (predicted.state_bytes, predicted.batch_bytes, predicted.peak_bytes) == (
        state,
        batch,
        peak,
    )
    assert (measured.state_bytes, measured.batch_bytes, measured.peak_bytes) == (
        state,
        batch,
        peak,
    )


def test_sequences_padded_to_the_longest_are_predicted_from_their_own_lengths():
    # The first two sequences share a length the others do not: a batch's shape depends on
    # its samples, though batches of one and two samples alone do not show it.
    lengths = [4, 4] + [4 + (7 * index) % 60 for index in range(2, 40)]
    sequences = [torch.randint(1, 20, (length,)) for length in lengths]

    def loss(model, batch):
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    task = make_mlp_task(
        model=TokenModel,
        train_data=sequences,
        collate=lambda samples: nn.utils.rnn.pad_sequence(samples, batch_first=True),
        loss=loss,
    )
    predicted = predict_step_memory(task, 16)
    measured = measure_step_memory(task, 16)
    # Both take the 16 longest samples (the worst batch training can draw), not the first 16.
    assert predicted.batch_bytes == measured.batch_bytes == _storage(8 * 16 * max(lengths))
    assert predicted.peak_bytes == measured.peak_bytes


def test_huge_batches_cost_nothing():
    task = load_example("digits")
    small = predict_step_memory(task, 1000)
    huge = predict_step_memory(task, 10_000_000)
    assert huge.batch_bytes > 100 * small.batch_bytes
    assert huge.peak_bytes > 2 * 10**9  # far more than this test could allocate for real


def test_prediction_leaves_random_state_alone():
    task = make_mlp_task()
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    predict_step_memory(task, 8)
    assert torch.equal(torch.rand(4), expected)


def test_a_device_torch_is_not_built_for_names_the_way_to_predict_for_a_card(monkeypatch, caplog):
    # A CPU-only torch cannot make fake CUDA tensors: the prediction used to blame the task
    # ("fake tensors cannot run task") and then fail in the measured fallback.
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as raised:
        predict_step_memory(make_mlp_task(), 8, device="cuda")
    message = str(raised.value)
    assert "torch build has no cuda support" in message
    assert "device='cpu' and cuda_kernels=True" in message and "--gpu" in message
    assert "cannot run task" not in caplog.text


class _DataDependent(nn.Module):
    """Keeps only the samples whose first input is positive: a data-dependent shape."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs[inputs[:, 0] > 0])


def _data_dependent_loss(model, batch):
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels[inputs[:, 0] > 0])


def test_fallback_to_a_measured_step_says_so(caplog):
    task = make_mlp_task(model=_DataDependent, loss=_data_dependent_loss)
    with caplog.at_level(logging.WARNING, logger="batchfit.memory.predict"):
        result = predict_step_memory(task, 16)
    assert result.method == "measured"
    assert result.fallback_reason
    assert result.peak_bytes == measure_step_memory(task, 16).peak_bytes
    assert "fake tensors cannot run" in caplog.text
    with pytest.raises(ConfigError, match="fake tensors cannot run"):
        predict_step_memory(task, 16, fallback=False)


def test_task_errors_propagate_unchanged(caplog):
    def broken(model, batch):
        return model(batch[0][:, :5]).sum()  # 5 features into an 8-feature layer

    # Fake mode cannot tell the task's bug from its own limits, so it falls back to a real
    # step, which raises the task's error as itself, with the real kernel's message.
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        predict_step_memory(make_mlp_task(loss=broken), 4)
    assert not isinstance(caught.value, (ConfigError, torch.OutOfMemoryError))
    with pytest.raises(ConfigError, match="fake tensors cannot run"):
        predict_step_memory(make_mlp_task(loss=broken), 4, fallback=False)
    # torch's own ERROR log of the failed meta kernel would report the bug a second time, in
    # fake mode's words, before batchfit's one-line message.
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses")]
    assert "failed while attempting to run meta" not in caplog.text


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        predict_step_memory(make_mlp_task(), 0)
    with pytest.raises(ConfigError, match="at least 2"):
        predict_step_memory(make_mlp_task(), 4, steps=1)


def test_memory_model_is_not_linear_at_small_batches_but_is_over_the_range_that_matters():
    task = load_example("digits")
    # Below a few hundred samples the optimizer step's temporaries set the peak, so the
    # peak hardly moves and then bends upwards: a line through small probes misleads.
    small = predict_memory_model(task, low=64, high=1024, points=4)
    assert small.batch_sizes == (64, 161, 406, 1024)
    assert small.max_residual_bytes > 0.02 * small.predict_bytes(1024)
    large = predict_memory_model(task, low=2048, high=8192, points=3)
    assert large.per_sample_bytes > 0
    assert large.max_residual_bytes < 0.001 * large.predict_bytes(8192)


def test_fit_over_given_points():
    model = fit_predicted_memory_model(lambda b: 1000 + 10 * b, [1, 2, 8, 8])
    assert model.fixed_bytes == pytest.approx(1000)
    assert model.per_sample_bytes == pytest.approx(10)
    assert model.max_residual_bytes == pytest.approx(0, abs=1e-6)


def test_range_batch_sizes():
    assert range_batch_sizes(16, 256, points=5) == [16, 32, 64, 128, 256]
    assert range_batch_sizes(5, 5) == [5]
    assert range_batch_sizes(1, 3, points=2) == [1, 3]


@pytest.mark.parametrize("name", list(EXAMPLE_BATCHES))
def test_peak_formula_is_exact_on_every_example(examples, name):
    from batchfit.memory.predict import PeakFormula

    task = examples[name]
    small = predict_step_memory(task, 2, record=True)
    large = predict_step_memory(task, 16, record=True)
    formula = PeakFormula.fit(small, large)
    assert formula is not None and formula.batch_sizes == (2, 16)
    for batch_size in (3, 40):
        assert formula.peak_bytes(batch_size) == predict_step_memory(task, batch_size).peak_bytes
    capacity = formula.peak_bytes(40) + 100
    assert formula.largest_fitting(capacity, max_batch_size=10_000) == 40
    assert formula.largest_fitting(capacity, max_batch_size=30) == 30
    assert formula.largest_fitting(100, max_batch_size=30) == 0


def test_peak_formula_refuses_different_shapes():
    from batchfit.memory.predict import PeakFormula

    task = make_mlp_task()
    plain = predict_step_memory(task, 2)
    recorded = predict_step_memory(task, 8, record=True)
    assert PeakFormula.fit(plain, recorded) is None
    other = predict_step_memory(
        make_mlp_task(optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr)), 4, record=True
    )
    assert PeakFormula.fit(recorded, other) is None
    assert "timeline" not in recorded.to_dict()
