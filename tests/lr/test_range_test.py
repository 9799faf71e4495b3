import math
import random

import numpy
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from batchfit.errors import ConfigError, TaskError
from batchfit.lr.range_test import lr_range_test
from batchfit.task import load_example
from tests.conftest import classification_loss, make_bn_convnet, make_mlp_task


def _bn_setup():
    """A BatchNorm conv net with Adam that already has state and gradients."""
    model = make_bn_convnet()
    generator = torch.Generator().manual_seed(3)
    data = TensorDataset(
        torch.randn(64, 1, 8, 8, generator=generator), torch.randint(3, (64,), generator=generator)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for start in (0, 16):
        optimizer.zero_grad()
        classification_loss(model, data[start : start + 16]).backward()
        optimizer.step()
    classification_loss(model, data[32:48]).backward()  # leave gradients behind, too
    model.eval()  # and a mode the test must switch away from and back
    return model, optimizer, data


def _rng_fingerprint():
    return (random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state())


def _same_rng(before, after):
    return before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])


def _assert_same_optimizer_state(before, after):
    assert before["param_groups"] == after["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        for name, value in state.items():
            other = after["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_model_optimizer_and_rng_restored_bitwise():
    model, optimizer, data = _bn_setup()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    grads = [param.grad.clone() for param in model.parameters()]
    opt_state = {
        "state": {
            key: {name: value.clone() for name, value in state.items()}
            for key, state in optimizer.state_dict()["state"].items()
        },
        "param_groups": [dict(group) for group in optimizer.state_dict()["param_groups"]],
    }
    random.seed(5), numpy.random.seed(5), torch.manual_seed(5)
    rng = _rng_fingerprint()

    result = lr_range_test(
        model, optimizer, loss=classification_loss, train_data=data, global_batch=16,
        start_lr=1e-4, end_lr=10.0, steps=20, smoothing=0.2,
    )  # fmt: skip

    assert result.steps_run >= 2  # it did train
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert not model.training and not any(module.training for module in model.modules())
    _assert_same_optimizer_state(opt_state, optimizer.state_dict())
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert _same_rng(rng, _rng_fingerprint())
    # the restored optimizer still steps the same parameters
    optimizer.step()
    assert not torch.equal(weights["0.weight"], model.state_dict()["0.weight"])


def test_state_restored_after_an_error_mid_test():
    model, optimizer, data = _bn_setup()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    rng = _rng_fingerprint()
    calls = []

    def failing_loss(module, batch):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return classification_loss(module, batch)

    with pytest.raises(RuntimeError, match="boom"):
        lr_range_test(
            model, optimizer, loss=failing_loss, train_data=data, global_batch=16, steps=10,
            smoothing=0.5,
        )  # fmt: skip
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    assert _same_rng(rng, _rng_fingerprint())


def test_task_path_leaves_task_and_rng_alone():
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    before = {name: value.clone() for name, value in module.state_dict().items()}
    task = make_mlp_task(model=module)
    rng = _rng_fingerprint()
    first = lr_range_test(task, steps=20, smoothing=0.2, start_lr=1e-4, end_lr=10.0)
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    assert _same_rng(rng, _rng_fingerprint())
    # seeded: the same test twice gives the same losses
    second = lr_range_test(task, steps=20, smoothing=0.2, start_lr=1e-4, end_lr=10.0)
    assert first.losses == second.losses


def test_stops_on_divergence():
    task = make_mlp_task()
    result = lr_range_test(task, start_lr=1e-3, end_lr=1e4, steps=60, smoothing=0.2)
    assert result.stop_reason == "diverged"
    assert result.steps_run < 60 and len(result.losses) == result.steps_run
    finite = [value for value in result.smoothed_losses[:-1]]
    assert result.smoothed_losses[-1] > 4.0 * min(finite)
    assert result.steepest_lr is not None and result.steepest_lr < result.lrs[-1]


def test_a_loss_below_zero_sweeps_as_the_same_loss_above_zero():
    # A constant shift changes no gradient; a ratio to a negative best stopped at step 2.
    plain = make_mlp_task()
    shifted = make_mlp_task(loss=lambda model, batch: classification_loss(model, batch) - 3.0)
    options = dict(start_lr=1e-3, end_lr=1e4, steps=60, smoothing=0.2)
    result, reference = lr_range_test(shifted, **options), lr_range_test(plain, **options)
    assert result.smoothed_losses[0] < 0 and result.steps_run > 10
    assert result.stop_reason == "diverged"
    assert result.steepest_lr == reference.steepest_lr
    assert result.valley_lr == reference.valley_lr
    assert "max(|best|, fall)" in dict(result.summary_rows())["stopped"]


def test_stops_when_the_loss_is_not_finite():
    model = nn.Linear(2, 1)
    data = TensorDataset(torch.randn(32, 2), torch.randn(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def loss(module, batch):
        calls.append(1)
        value = F.mse_loss(module(batch[0]), batch[1])
        return value * math.inf if len(calls) > 12 else value

    result = lr_range_test(
        model, optimizer, loss=loss, train_data=data, global_batch=8, steps=20,
        smoothing=0.5, start_lr=1e-5, end_lr=1e-3, diverge_factor=1e9,
    )  # fmt: skip
    assert result.stop_reason == "not_finite" and result.steps_run == 13
    assert result.to_dict()["losses"][-1] is None  # JSON-safe


def test_accumulation_matches_one_big_batch():
    task = make_mlp_task()
    options = dict(start_lr=1e-3, end_lr=3.0, steps=20, smoothing=0.2, global_batch=32)
    whole = lr_range_test(task, micro_batch=32, **options)
    pieces = lr_range_test(task, micro_batch=8, **options)
    uneven = lr_range_test(task, micro_batch=12, **options)  # 12 + 12 + 8
    assert pieces.accumulation_steps == 4 and uneven.accumulation_steps == 3
    assert pieces.lrs == whole.lrs
    assert pieces.losses == pytest.approx(whole.losses, rel=1e-5, abs=1e-6)
    assert uneven.losses == pytest.approx(whole.losses, rel=1e-5, abs=1e-6)


def test_dataloader_gives_data_and_batch_size():
    model = nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.randn(40, 2), torch.randn(40, 1)), batch_size=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    result = lr_range_test(model, optimizer, loss=mse, train_data=loader, steps=10, smoothing=1)
    assert result.global_batch == 10 and result.steps_run >= 2


def _bad(**overrides):
    options = dict(steps=20, smoothing=0.2)
    options.update(overrides)
    return options


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (_bad(start_lr=1.0, end_lr=1.0), "must be below end_lr"),
        (_bad(start_lr=2.0, end_lr=1.0), "must be below end_lr"),
        (_bad(start_lr=0.0), "start_lr must be a positive rate"),
        (_bad(end_lr=-1.0), "end_lr must be a positive rate"),
        (_bad(steps=30, smoothing=0.05), "fewer than the smoothing 0.05 needs: at least 40"),
        (_bad(steps=0), "steps must be a positive"),
        (_bad(smoothing=0.0), "smoothing must be in (0, 1]"),
        (_bad(diverge_factor=1.0), "diverge_factor must be above 1"),
        (_bad(mode="cosine"), "mode 'cosine' is unknown"),
        (_bad(global_batch=0), "global_batch must be a positive"),
        (_bad(micro_batch=-2), "micro_batch must be a positive"),
        (_bad(global_batch=8, micro_batch=16), "micro_batch (16) is larger than global_batch"),
        (_bad(global_batch=1000), "larger than the training data (256 samples)"),
        (_bad(device="gpu7"), "device 'gpu7' is unknown"),
    ],
)
def test_bad_settings(options, words):
    with pytest.raises(ConfigError) as caught:
        lr_range_test(make_mlp_task(), **options)
    assert words in str(caught.value)


def test_non_finite_loss_at_the_first_step():
    task = make_mlp_task(loss=lambda model, batch: model(batch[0]).sum() * math.nan)
    with pytest.raises(TaskError, match="nan at the first step"):
        lr_range_test(task, steps=20, smoothing=0.2)


def test_model_form_needs_its_pieces():
    with pytest.raises(ConfigError, match="needs optimizer, loss, train_data"):
        lr_range_test(nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="leave out optimizer"):
        model = nn.Linear(2, 1)
        lr_range_test(make_mlp_task(), torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("name", ["digits", "cnn", "unet", "charlm"])
def test_every_example(name):
    task = load_example(name)
    result = lr_range_test(
        task, start_lr=1e-5, end_lr=1.0, steps=10, smoothing=0.5, global_batch=4, micro_batch=2
    )
    assert 2 <= result.steps_run <= 10
    assert all(math.isfinite(value) for value in result.losses[:-1])
    # A sweep that stopped early says why; "completed" means every step ran.
    if result.steps_run < 10:
        assert result.stop_reason in ("diverged", "not_finite")
    if result.stop_reason == "completed":
        assert result.steps_run == 10
    assert len(result.to_dict()["lrs"]) == result.steps_run


def test_memory_budget_picks_or_checks_the_micro_batch():
    task = make_mlp_task()
    options = dict(steps=10, smoothing=0.5, global_batch=250, memory_budget="32KiB")
    result = lr_range_test(task, **options)
    assert result.micro_batch < 250 and result.accumulation_steps >= 2
    with pytest.raises(
        ConfigError, match=r"micro_batch 250 does not fit: .* on this machine is \d+"
    ):
        lr_range_test(task, micro_batch=250, **options)


def test_a_large_budget_searches_no_further_than_the_micro_batch(monkeypatch):
    # A small model under a large budget: the search's default bound (2^24 samples) would
    # confirm its answer with a real step of millions of samples, for minutes.
    import batchfit.memory.runnable as runnable

    searched = []

    def spy(task, **options):
        result = real_search(task, **options)
        searched.append((options["max_batch_size"], max(t.batch_size for t in result.trials)))
        return result

    real_search = runnable.find_max_batch_size
    monkeypatch.setattr(runnable, "find_max_batch_size", spy)
    options = dict(steps=10, smoothing=0.5, global_batch=64, memory_budget="1GiB")
    assert lr_range_test(make_mlp_task(), **options).micro_batch == 64
    assert lr_range_test(make_mlp_task(), micro_batch=32, **options).micro_batch == 32
    assert searched == [(64, 64), (32, 32)]


@pytest.mark.slow
def test_default_sweep_on_cnn_with_accumulation_suggests_a_trainable_rate():
    task = load_example("cnn")  # SGD with momentum, BatchNorm; tuned at 0.05 for batch 64
    result = lr_range_test(task, global_batch=64, micro_batch=32, device="cpu")
    assert result.steps == 100 and result.accumulation_steps == 2
    assert result.stop_reason == "diverged"
    for rate in (result.steepest_lr, result.valley_lr):
        assert 1e-3 < rate < 1.0  # around the task's tuned 0.05, far from both ends


def test_the_range_test_uses_the_one_smoothing_and_suggestions_of_lr_suggest():
    from batchfit.lr.suggest import find_valley, smooth_losses, suggest_steepest

    result = lr_range_test(make_mlp_task(samples=128), steps=20, smoothing=0.3, device="cpu")
    losses = list(result.losses)
    assert list(result.smoothed_losses) == smooth_losses(losses, 0.3)
    assert result.steepest_index == suggest_steepest(result.lrs, result.smoothed_losses)
    valley = find_valley(result.smoothed_losses)
    assert (result.valley_start_lr, result.valley_end_lr) == (
        (None, None) if valley is None else (result.lrs[valley[0]], result.lrs[valley[1]])
    )


def test_the_valley_rate_is_lr_suggests_valley_point(monkeypatch):
    # the midpoint of the valley has one home, lr.suggest.suggest_valley
    import batchfit.lr.range_test as range_test

    asked = []

    def spy(smoothed_losses):
        asked.append(list(smoothed_losses))
        return 1

    monkeypatch.setattr(range_test, "suggest_valley", spy)
    result = lr_range_test(make_mlp_task(samples=128), steps=20, smoothing=0.3, device="cpu")
    assert asked == [list(result.smoothed_losses)]
    assert (result.valley_index, result.valley_lr) == (1, result.lrs[1])


def test_steps_read_the_training_loops_sample_order():
    # One seeded sample order: step s of the test takes training's global batch s.
    from batchfit.training.sampling import global_batch_indices

    seen: list[list[int]] = []

    def recording_loss(model, batch):
        seen.append(batch[0][:, 0].long().tolist())
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    inputs = torch.zeros(40, 3)
    inputs[:, 0] = torch.arange(40)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(inputs, torch.zeros(40, 1))
    lr_range_test(
        model,
        optimizer,
        loss=recording_loss,
        train_data=data,
        global_batch=16,
        start_lr=1e-9,
        end_lr=1e-8,
        steps=40,
        smoothing=0.05,
        seed=3,
    )
    expected = [
        global_batch_indices(step, dataset_size=40, global_batch=16, seed=3) for step in range(40)
    ]
    assert seen == expected


def test_a_budget_for_another_device_picks_a_micro_batch_this_machine_runs(monkeypatch):
    # An 80 GB card on a machine with 32 KiB free: the predicted limit is far above what runs
    # here, so the micro-batch is the host's limit, not the card's.
    from batchfit import devices
    from batchfit.memory.runnable import runnable_batch_size

    task = make_mlp_task()
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 1 << 15)
    host = runnable_batch_size(task, device="cpu", memory_budget="H100-80GB")
    assert host < 250
    options = dict(steps=10, smoothing=0.5, global_batch=250, memory_budget="H100-80GB")
    result = lr_range_test(task, device="cpu", **options)
    assert result.micro_batch == host
    with pytest.raises(ConfigError, match=f"on this machine is {host};"):
        lr_range_test(task, device="cpu", micro_batch=250, **options)


@pytest.mark.parametrize(
    ("global_batch", "micro_batch", "words"),
    [(9, 4, "4+4+1; use a micro_batch that leaves no single sample, e.g. 3"),
     (4, 1, "1+1+1+1; use a micro_batch that leaves no single sample, e.g. 2"),
     (1, None, "use a global_batch of at least 2")],
)  # fmt: skip
def test_batchnorm_micro_batch_of_one_sample_names_the_split_and_the_fix(
    global_batch, micro_batch, words
):
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ConfigError, match="BatchNorm") as caught:
        lr_range_test(
            model, optimizer, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
            train_data=data, global_batch=global_batch, micro_batch=micro_batch, steps=40,
        )  # fmt: skip
    assert words in str(caught.value)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_an_interrupted_test_keeps_the_steps_it_measured_and_restores_the_model():
    # Ctrl-C (or SIGTERM under the CLI) partway through once left nothing of the steps run.
    from batchfit.lr.result import RangeTestInterrupted

    model, optimizer, data = _bn_setup()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    calls = []

    def interrupted_loss(module, batch):
        calls.append(1)
        if len(calls) == 6:  # within the sixth step, before its loss is known
            raise KeyboardInterrupt
        return classification_loss(module, batch)

    with pytest.raises(RangeTestInterrupted) as caught:
        lr_range_test(
            model, optimizer, loss=interrupted_loss, train_data=data, global_batch=16,
            steps=10, smoothing=0.5, start_lr=1e-6, end_lr=1e-5,
        )  # fmt: skip
    result = caught.value.result
    assert isinstance(caught.value, KeyboardInterrupt)  # a caller not looking for it stops
    assert result.stop_reason == "interrupted" and result.steps_run == 5 == len(result.losses)
    assert len(result.smoothed_losses) == 5 and result.steps == 10
    assert result.inconclusive_reason.startswith(f"it was interrupted at rate {result.lrs[-1]:.3g}")
    assert result.describe().startswith(f"Interrupted at rate {result.lrs[-1]:.3g} after 5 of 10")
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    # interrupted before any step was measured: nothing to keep, a plain KeyboardInterrupt
    calls.clear()
    calls.extend([1] * 5)
    with pytest.raises(KeyboardInterrupt) as early:
        lr_range_test(
            model, optimizer, loss=interrupted_loss, train_data=data, global_batch=16,
            steps=10, smoothing=0.5,
        )  # fmt: skip
    assert not isinstance(early.value, RangeTestInterrupted)
