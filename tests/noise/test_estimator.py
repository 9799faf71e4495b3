"""Tests of batchfit.noise.estimator: estimators and tracker; the noise-scale CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from batchfit.cli.main import main
from batchfit.errors import CheckpointError, ConfigError
from batchfit.noise.estimator import (
    NoiseScaleTracker,
    estimate_gradient_statistics,
    variance_factor,
)
from batchfit.task import EXAMPLES

# --- the estimator formulas ---------------------------------------------------------------


def test_formulas_recover_known_values_from_exact_expectations():
    # |G|^2 = 2, tr(Sigma) = 12: E|g_B|^2 = 2 + 12 c(B)
    for dataset_size in (None, 50):
        small = 2 + 12 * variance_factor(4, dataset_size)
        big = 2 + 12 * variance_factor(20, dataset_size)
        gradient_sq, trace = estimate_gradient_statistics(
            small, big, small_batch=4, big_batch=20, dataset_size=dataset_size
        )
        assert gradient_sq == pytest.approx(2.0)
        assert trace == pytest.approx(12.0)


def test_finite_population_factor_matches_sampling_without_replacement():
    assert variance_factor(8) == pytest.approx(1 / 8)
    assert variance_factor(8, 16) == pytest.approx((16 - 8) / (8 * 15))
    assert variance_factor(16, 16) == 0.0  # the whole data set: the exact gradient


def _mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def test_estimates_are_unbiased_on_synthetic_gradients_infinite_population():
    # Per-example gradients ~ N(G, Sigma) with known G and diagonal Sigma, drawn with replacement.
    generator = torch.Generator().manual_seed(0)
    dims, small, big, trials = 10, 4, 32, 4000
    mean = torch.linspace(-0.5, 0.5, dims, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, dims, dtype=torch.float64)
    true_gradient_sq, true_trace = float(mean.square().sum()), float(scales.square().sum())
    samples = mean + scales * torch.randn(
        trials, big, dims, generator=generator, dtype=torch.float64
    )
    small_sq = samples[:, :small].mean(1).square().sum(1)
    big_sq = samples.mean(1).square().sum(1)
    estimates = [
        estimate_gradient_statistics(float(s), float(b), small_batch=small, big_batch=big)
        for s, b in zip(small_sq, big_sq)
    ]
    gradient_sq = torch.tensor([e[0] for e in estimates])
    trace = torch.tensor([e[1] for e in estimates])
    # Tolerance from the sample count: 4 standard errors of the mean over `trials` draws.
    value, error = _mean_and_error(gradient_sq)
    assert abs(value - true_gradient_sq) < 4 * error
    value, error = _mean_and_error(trace)
    assert abs(value - true_trace) < 4 * error


def test_estimates_are_unbiased_without_replacement_only_when_corrected():
    # A fixed population of N gradients; batches drawn without replacement, as a shuffling
    # loader does. The corrected estimates hit the population |G|^2 and tr(Sigma) (divided by
    # N); the uncorrected |G|^2 is biased low by tr(Sigma) / (N - 1), far beyond the error.
    generator = torch.Generator().manual_seed(1)
    population, dims, small, big, trials = 40, 6, 4, 16, 4000
    gradients = 0.3 + torch.randn(population, dims, generator=generator, dtype=torch.float64)
    true_mean = gradients.mean(0)
    true_gradient_sq = float(true_mean.square().sum())
    true_trace = float((gradients - true_mean).square().sum(1).mean())
    order = torch.rand(trials, population, generator=generator).argsort(1)[:, :big]
    batches = gradients[order]  # trials x big x dims; the first `small` form the small batch
    small_sq = batches[:, :small].mean(1).square().sum(1)
    big_sq = batches.mean(1).square().sum(1)
    corrected = [
        estimate_gradient_statistics(
            float(s), float(b), small_batch=small, big_batch=big, dataset_size=population
        )
        for s, b in zip(small_sq, big_sq)
    ]
    plain = [
        estimate_gradient_statistics(float(s), float(b), small_batch=small, big_batch=big)
        for s, b in zip(small_sq, big_sq)
    ]
    value, error = _mean_and_error(torch.tensor([e[0] for e in corrected]))
    assert abs(value - true_gradient_sq) < 4 * error
    value, error = _mean_and_error(torch.tensor([e[1] for e in corrected]))
    assert abs(value - true_trace) < 4 * error
    value, error = _mean_and_error(torch.tensor([e[0] for e in plain]))
    assert abs(value - true_gradient_sq) > 4 * error


@pytest.mark.parametrize(
    ("small", "big", "size", "words"),
    [
        (8, 8, None, "below big_batch"),
        (16, 8, None, "below big_batch"),
        (0, 8, None, "positive"),
        (-2, 8, None, "positive"),
        (4, 64, 32, "larger than the training set"),
        (4, 8, 1, "at least 2"),
    ],
)
def test_bad_batch_sizes_are_config_errors(small, big, size, words):
    with pytest.raises(ConfigError, match=words):
        estimate_gradient_statistics(1.0, 0.5, small_batch=small, big_batch=big, dataset_size=size)


# --- the tracker --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, -1, "100", 100.0, True])
def test_tracker_names_a_bad_dataset_size(size):
    # 0 and 1 were reported as "small_batch (1) must be below big_batch (1)", arguments the
    # caller never gave; "100" raised TypeError from a comparison.
    with pytest.raises(ConfigError, match=r"dataset_size must be a whole number of at least 2"):
        NoiseScaleTracker(dataset_size=size)


def test_tracker_smooths_both_statistics_before_the_ratio():
    tracker = NoiseScaleTracker(window=None)
    # Two updates whose single ratios are 8 and 1; the ratio of means is (8 + 2) / (1 + 2).
    tracker.update(5.0, 2.0, small_batch=2, big_batch=8)  # |G|^2 1, tr 8
    tracker.update(3.0, 2.25, small_batch=2, big_batch=8)  # |G|^2 2, tr 2
    assert tracker.gradient_sq_norm == pytest.approx(1.5)
    assert tracker.trace_covariance == pytest.approx(5.0)
    assert tracker.noise_scale == pytest.approx(10 / 3)


def test_tracker_window_forgets_old_steps_and_reads_a_trend_at_its_end():
    tracker = NoiseScaleTracker(window=4)
    tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
    assert tracker.noise_scale == pytest.approx(8.0)  # one update: no pull toward zero
    for _ in range(4):
        tracker.update(3.0, 2.25, small_batch=2, big_batch=8)  # |G|^2 2, tr 2
    assert tracker.noise_scale == pytest.approx(1.0, rel=1e-12)  # the first update left
    # per-step |G|^2 of 1, 2, 3, 4 (tr(Sigma) 8 each): the line's end reads 4, the mean 2.5
    trend = NoiseScaleTracker(window=4)
    for gradient_sq in (1.0, 2.0, 3.0, 4.0):
        # E|g_2|^2 = G + 8/2, E|g_8|^2 = G + 8/8
        trend.update(gradient_sq + 4, gradient_sq + 1, small_batch=2, big_batch=8)
    assert trend.gradient_sq_norm == pytest.approx(4.0)
    assert trend.trace_covariance == pytest.approx(8.0)
    assert trend.noise_scale == pytest.approx(2.0)
    plain = NoiseScaleTracker(window=None)
    for gradient_sq in (1.0, 2.0, 3.0, 4.0):
        plain.update(gradient_sq + 4, gradient_sq + 1, small_batch=2, big_batch=8)
    assert plain.gradient_sq_norm == pytest.approx(2.5)


def test_a_fast_fall_that_the_trend_line_overshoots_reads_the_window_means():
    # |G|^2 of 64, 8, 4, 2 and tr(Sigma) 10 x that (noise scale 10 throughout): the straight
    # line through |G|^2 ends at -9, below every value; the ratio of the means is exact.
    tracker = NoiseScaleTracker(window=4)
    for gradient_sq in (64.0, 8.0, 4.0, 2.0):
        trace = 10 * gradient_sq  # E|g_2|^2 = G + tr/2, E|g_8|^2 = G + tr/8
        tracker.update(gradient_sq + trace / 2, gradient_sq + trace / 8, small_batch=2, big_batch=8)
    assert tracker.gradient_sq_norm == pytest.approx(19.5)  # the mean: (64 + 8 + 4 + 2) / 4
    assert tracker.trace_covariance == pytest.approx(195.0)
    assert tracker.noise_scale == pytest.approx(10.0)
    assert tracker.estimate().reliable is False  # 4 steps: too few, but no longer undefined


def test_a_trend_line_whose_end_is_lost_in_the_noise_reads_the_window_means():
    # |G|^2 zigzags down (0.35 to 0.01) around a mean of 0.19125; tr(Sigma) 25 throughout. The
    # line's end, 0.0717, is only 1.2 standard errors (0.0616) above zero: read there, the
    # noise scale was 349 (and, in a Lightning run, 35,910 one step and 91 the next).
    tracker = NoiseScaleTracker(window=8)
    for gradient_sq in (0.30, 0.22, 0.35, 0.12, 0.28, 0.05, 0.20, 0.01):
        tracker.update(gradient_sq + 25 / 2, gradient_sq + 25 / 8, small_batch=2, big_batch=8)
    assert tracker.gradient_sq_norm == pytest.approx(0.19125)
    assert tracker.noise_scale == pytest.approx(25 / 0.19125)
    result = tracker.estimate()
    assert result.low_samples <= result.noise_scale_samples <= result.high_samples


def test_tracker_interval_always_holds_its_estimate():
    import random

    random.seed(3)
    tracker = NoiseScaleTracker(window=30)
    for step in range(200):
        # a falling |G|^2 under heavy noise, as late in training
        gradient_sq = 10 * 0.98**step + random.gauss(0, 3)
        small, big = gradient_sq + 40 / 2, gradient_sq + 40 / 8
        tracker.update(max(small, 0.0), max(big, 0.0), small_batch=2, big_batch=8)
        result = tracker.estimate()
        if result.noise_scale_samples is not None:
            assert result.low_samples <= result.noise_scale_samples
            assert result.high_samples is None or result.noise_scale_samples <= result.high_samples


def test_tracker_interval_covers_the_value_its_trend_line_reads():
    """The interval is a bootstrap of the estimate itself, the window's trend line read at its
    end, not of the window's means: while |G|^2 falls steadily the means lag behind, and an
    interval of theirs, only stretched to hold the estimate, had the estimate at its edge and
    missed the true value at the window's end in most trials."""
    import random

    random.seed(0)
    covered = trials = 0
    at_edge = 0
    for _ in range(40):
        tracker = NoiseScaleTracker(window=30)
        for step in range(30):
            gradient_sq = 2.0 - step / 29 + random.gauss(0, 0.15)  # falls from 2 to 1
            trace = 8.0 + random.gauss(0, 0.6)
            tracker.update(
                gradient_sq + trace / 2, gradient_sq + trace / 8, small_batch=2, big_batch=8
            )
        result = tracker.estimate()
        trials += 1
        covered += result.low_samples <= 8.0 <= result.high_samples
        at_edge += result.noise_scale_samples in (result.low_samples, result.high_samples)
    assert covered >= 0.75 * trials  # a 90% interval (36 of 40 here); 18 of 40 before
    assert at_edge <= 0.1 * trials


def test_estimate_with_non_positive_gradient_norm_is_not_reliable():
    tracker = NoiseScaleTracker(window=30)
    for _ in range(10):
        # |G|^2 = (8 * 1 - 2 * 10) / 6 = -2: all noise
        tracker.update(10.0, 1.0, small_batch=2, big_batch=8)
    result = tracker.estimate()
    assert not result.reliable
    assert result.noise_scale_samples is None and tracker.noise_scale is None
    assert "|G|^2" in result.reason and "not yet positive" in result.reason
    assert result.describe().startswith("Not yet reliable")
    assert result.to_dict()["noise_scale_samples"] is None


def test_too_few_batches_or_no_noise_are_not_reliable():
    tracker = NoiseScaleTracker()
    assert not tracker.estimate().reliable and "no batches" in tracker.estimate().reason
    tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
    assert "only 1 batch measured" in tracker.estimate().reason  # not "1 batch(es)"
    noiseless = NoiseScaleTracker()
    for _ in range(6):
        noiseless.update(1.0, 1.0, small_batch=2, big_batch=8)
    assert "tr(Sigma)" in noiseless.estimate().reason


def test_tracker_state_dict_round_trip_continues_identically():
    import random

    random.seed(0)
    pairs = [(5.0 + random.random(), 2.0 + 0.1 * random.random()) for _ in range(12)]
    whole = NoiseScaleTracker(dataset_size=1000, window=5)
    first = NoiseScaleTracker(dataset_size=1000, window=5)
    for index, (small, big) in enumerate(pairs):
        whole.update(small, big, small_batch=2, big_batch=8)
        if index < 6:
            first.update(small, big, small_batch=2, big_batch=8)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = NoiseScaleTracker(dataset_size=1000, window=5)
    resumed.load_state_dict(state)
    for small, big in pairs[6:]:
        resumed.update(small, big, small_batch=2, big_batch=8)
    assert resumed.noise_scale == pytest.approx(whole.noise_scale, rel=1e-12)
    assert resumed.estimate().to_dict() == whole.estimate().to_dict()


def test_norms_that_are_tensors_or_numpy_scalars():
    # A tensor was refused as "must be a finite, non-negative squared norm ... overflowed";
    # a NumPy float32, a number, likewise.
    tracker = NoiseScaleTracker(window=None)
    with pytest.raises(ConfigError, match=r"small_sq_norm must be a number.*Tensor.*\.item\(\)"):
        tracker.update(torch.tensor(5.0), 2.0, small_batch=2, big_batch=8)
    for _ in range(5):
        tracker.update(np.float32(5.0), np.float32(2.0), small_batch=2, big_batch=8)
    assert tracker.noise_scale == pytest.approx(8.0)
    assert json.loads(json.dumps(tracker.state_dict()))["pairs"][0] == [1.0, 8.0]


def test_loading_state_from_a_different_tracker_is_refused():
    state = NoiseScaleTracker(dataset_size=100).state_dict()
    with pytest.raises(CheckpointError, match="dataset_size=100"):
        NoiseScaleTracker(dataset_size=None).load_state_dict(state)
    with pytest.raises(CheckpointError, match="window=30"):
        NoiseScaleTracker(dataset_size=100, window=10).load_state_dict(state)
    with pytest.raises(CheckpointError, match="version 99.*start a new tracker"):
        NoiseScaleTracker().load_state_dict({"version": 99})


@pytest.mark.parametrize("drop", ["pairs", "dataset_size", "samples_seen"])
def test_a_state_missing_a_key_is_refused_by_name(drop):
    # A KeyError('dataset_size') (or 'pairs', ...) before.
    state = NoiseScaleTracker().state_dict()
    del state[drop]
    with pytest.raises(CheckpointError, match=rf"\(version 2\) lacks {drop}: .*start a new"):
        NoiseScaleTracker().load_state_dict(state)


def test_a_version_1_moving_average_state_loads_into_the_window():
    # what NoiseScaleTracker(ema_decay=0.99).state_dict() wrote before the window
    history = [[1.0 + index, 8.0] for index in range(40)]
    old = {
        "version": 1, "dataset_size": 1000, "ema_decay": 0.99, "gradient_sq_sum": 0.0,
        "trace_sum": 0.0, "weight": 0.0, "history": history, "all": None, "updates": 40,
        "step": 40, "samples_seen": 320, "small_batch": 2.0, "big_batch": 8.0,
    }  # fmt: skip
    tracker = NoiseScaleTracker(dataset_size=1000, window=4)
    tracker.load_state_dict(old)
    assert tracker.gradient_sq_norm == pytest.approx(40.0)  # the last 4 steps: 37..40
    assert (tracker.updates, tracker.step, tracker.samples_seen) == (40, 40, 320)


@pytest.mark.parametrize("window", [0, 1, 2.5, "30", True])
def test_bad_window(window):
    with pytest.raises(ConfigError, match="window must be a whole number of at least 2"):
        NoiseScaleTracker(window=window)


def test_update_refuses_non_finite_norms():
    with pytest.raises(ConfigError, match="finite"):
        NoiseScaleTracker().update(float("nan"), 1.0, small_batch=2, big_batch=8)


# --- the command line ---------------------------------------------------------------------

TINY = ["--small-batch", "2", "--big-batch", "4", "--batches", "2", "--warmup-steps", "1"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_cli_json_on_every_example(name, capsys):
    assert main(["noise-scale", "--example", name, *TINY, "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batches"] == 2 and data["big_batch_samples"] == 4
    assert data["step"] == 1 and "meaning" in data


def test_cli_table_says_what_the_number_means_and_plots(tmp_path, capsys):
    plot = tmp_path / "noise.png"
    argv = ["noise-scale", "--example", "digits", "--small-batch", "4", "--big-batch", "32"]
    argv += ["--batches", "12", "--warmup-steps", "5", "--device", "cpu", "--plot", str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "noise scale B_simple" in out and "90% interval" in out
    assert "Critical batch size about" in out and "doubling the batch" in out
    assert "mostly wasted" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--small-batch", "16", "--big-batch", "16"], "below big_batch"),
        (["--small-batch", "0"], "--small-batch must lie in [1, 16777216], got 0"),
        (["--big-batch", "100000"], "larger than the training set"),
        (["--batches", "-3"], "batches"),
        (["--small-batch", "four"], "not a whole number"),
        (
            ["--small-batch", "512", "--big-batch", "1024", "--memory-budget", "2.5MiB"],
            "largest batch that fits is",
        ),
        (["--plot", "noise.jpg", "--batches", "2", "--warmup-steps", "0"], ".png"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(flags, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["noise-scale", "--example", "digits", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchfit: error:") and words in err
    assert len(err.splitlines()) == 1


def test_a_big_batch_in_tokens_against_a_dataset_in_samples_is_named_as_a_unit_mismatch():
    # A watch given token counts (139 tokens per step over 64 sequences) was told only that the
    # big batch was larger than the training set, with dataset_size=len(data) in samples.
    tracker = NoiseScaleTracker(dataset_size=64)
    with pytest.raises(ConfigError, match=r"big_batch \(139\).*need dataset_size in tokens"):
        tracker.update(2.0, 1.0, small_batch=70, big_batch=139)
