"""Tests of batchfit.plots: every picture from plain data, and the files the CLI writes."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import batchfit
from batchfit.errors import ConfigError, MissingDependencyError
from batchfit.lr.range_test import lr_range_test
from batchfit.lr.schedules import ScheduleConfig
from batchfit.noise.estimator import NoiseScaleTracker
from batchfit.plots import figure
from batchfit.plots.memory import memory_png
from batchfit.plots.noise_scale import noise_scale_png, plot_noise_scale
from batchfit.plots.range_test import plot_range_test, range_test_png
from batchfit.plots.schedule import plot_schedule
from batchfit.plots.throughput import plot_throughput, throughput_png
from batchfit.throughput.result import ThroughputResult
from tests.conftest import make_mlp_task
from tests.plots.capture import captured

PNG = b"\x89PNG\r\n\x1a\n"


def _range_result(end_lr):
    model = torch.nn.Linear(3, 1)
    data = TensorDataset(torch.randn(32, 3), torch.randn(32, 1))
    return lr_range_test(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        loss=lambda m, b: F.mse_loss(m(b[0]), b[1]), train_data=data, global_batch=8,
        steps=20, smoothing=0.3, start_lr=1e-3, end_lr=end_lr,
    )  # fmt: skip


def _throughput_result(tokens):
    sizes = (1, 2, 4, 8)
    seconds = (0.01, 0.011, 0.012, 0.02)
    return ThroughputResult(
        batch_sizes=sizes,
        seconds_per_step=seconds,
        samples_per_second=tuple(b / s for b, s in zip(sizes, seconds)),
        tokens_per_second=tuple(64 * b / s for b, s in zip(sizes, seconds)) if tokens else None,
        step_seconds=tuple((s * 0.9, s, s * 1.2) for s in seconds),
        knee_batch=4,
        best_batch=8,
        fraction=0.9,
        limit_batch=8,
        limit_reason="out_of_memory",
        stopped_early=False,
        warmup_steps=2,
        repeats=3,
        device="cpu",
    )


# --- range test ---------------------------------------------------------------------------


@pytest.mark.parametrize("end_lr", [1.0, 1e4])  # completed, and diverged
def test_range_test_writes_a_png(tmp_path, end_lr):
    path = plot_range_test(_range_result(end_lr), tmp_path / "lr.png", title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [path]


def test_range_test_rejects_other_suffixes(tmp_path):
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_range_test(_range_result(1.0), tmp_path / "lr.pdf")


def test_range_test_from_a_plans_measurement_with_non_finite_losses():
    # the subset a Plan keeps: rates instead of indices, None for a nan loss
    data = {
        "lrs": [1e-3, 1e-2, 1e-1, 1.0],
        "losses": [2.0, 1.5, 1.0, None],
        "smoothed_losses": [2.0, 1.8, 1.4, None],
        "steepest_lr": 1e-2,
        "valley_lr": 0.5,  # not one of the rates: drawn as a line only
        "stop_reason": "not_finite",
    }
    assert range_test_png(data, chosen_lr=0.05).startswith(PNG)


# --- throughput ---------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [False, True])
def test_throughput_writes_a_png(tmp_path, tokens):
    path = plot_throughput(_throughput_result(tokens), tmp_path / "t.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [path]


def test_throughput_rejects_other_suffixes(tmp_path):
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_throughput(_throughput_result(False), tmp_path / "t.svg")


def test_throughput_from_a_plans_measurement():
    data = {"batch_sizes": [4, 16, 64], "samples_per_second": [100.0, 300.0, 320.0]}
    assert throughput_png({**data, "knee_batch": 16, "fraction": 0.9}).startswith(PNG)


# --- noise scale --------------------------------------------------------------------------


def test_noise_scale_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    result = batchfit.measure_noise_scale(make_mlp_task(), batches=8, warmup_steps=2, device="cpu")
    path = plot_noise_scale(result, tmp_path / "plots" / "noise.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["noise.png"]


def test_noise_scale_refuses_other_formats_and_results_without_running_points(tmp_path):
    result = batchfit.measure_noise_scale(make_mlp_task(), batches=3, warmup_steps=0, device="cpu")
    with pytest.raises(ConfigError, match=r"\.png"):
        plot_noise_scale(result, tmp_path / "noise.svg")
    tracker = NoiseScaleTracker()
    tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
    with pytest.raises(ConfigError, match="no running estimate"):
        plot_noise_scale(tracker.estimate(), tmp_path / "noise.png")


@pytest.mark.parametrize("estimate", [40.0, None])  # reliable, and not yet reliable
def test_noise_scale_from_plain_points_without_intervals(estimate):
    data = {
        "noise_scale_samples": estimate,
        "low_samples": None if estimate is None else 30.0,
        "high_samples": None if estimate is None else 55.0,
        "running": [
            {"batches": 1, "noise_scale_samples": None},
            {"batches": 2, "noise_scale_samples": 900.0},
            {"batches": 3, "noise_scale_samples": 45.0},
        ],
    }
    assert noise_scale_png(data, global_batch=64).startswith(PNG)


# --- schedule -----------------------------------------------------------------------------


def test_schedule_writes_a_png(tmp_path):
    config = ScheduleConfig(total_steps=5000, warmup_steps=250, decay="step", step_every=1000)
    path = plot_schedule(config, 0.4, tmp_path / "plots" / "lr.png")
    assert path == tmp_path / "plots" / "lr.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["lr.png"]  # no temporary left behind


def test_schedule_bad_input(tmp_path):
    config = ScheduleConfig(total_steps=10)
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_schedule(config, 0.1, tmp_path / "lr.jpg")
    with pytest.raises(ConfigError, match="base_lr"):
        plot_schedule(config, -1, tmp_path / "lr.png")
    with pytest.raises(ConfigError, match="must be a batchfit ScheduleConfig, got dict"):
        plot_schedule({"total_steps": 10}, 0.1, tmp_path / "lr.png")
    assert not (tmp_path / "lr.png").exists()


def test_one_step_schedule(tmp_path, monkeypatch):
    assert plot_schedule(ScheduleConfig(total_steps=1), 0.1, tmp_path / "lr.png").exists()
    # its one rate is a dot (a line through one point draws nothing), its title "1 step"
    from batchfit.plots import schedule as module

    figures = captured(monkeypatch, module)
    module.schedule_png(ScheduleConfig(total_steps=1), 0.1)
    (axes,) = figures[0].axes
    (line,) = axes.get_lines()
    assert line.get_marker() == "o" and list(line.get_ydata()) == [0.1]
    assert axes.get_title().startswith("1 step, ")


# --- memory -------------------------------------------------------------------------------


def test_memory_with_probes_fit_budget_and_trials():
    data = {
        "probes": [[1, 2**20], [8, 3 * 2**20], [32, 9 * 2**20]],
        "trials": [
            {"batch_size": 40, "fits": True, "measured_bytes": 11 * 2**20},
            {"batch_size": 48, "fits": False, "predicted_bytes": 13 * 2**20},
            {"batch_size": 44, "fits": False, "predicted_bytes": 12 * 2**20},  # legend once
            {"batch_size": 46, "fits": None},  # nothing to draw
        ],
        "fixed_bytes": 2**20,
        "per_sample_bytes": 2**18,
        "capacity_bytes": 12 * 2**20,
        "limit_batch": 40,
    }
    assert memory_png(data).startswith(PNG)
    assert memory_png({}).startswith(PNG)


# --- shared -------------------------------------------------------------------------------


def test_public_names_still_exported_from_batchfit():
    assert batchfit.plot_range_test is plot_range_test
    assert batchfit.plot_throughput is plot_throughput
    assert batchfit.plot_noise_scale is plot_noise_scale
    assert batchfit.plot_schedule is plot_schedule


def test_no_pyplot_figures_left_open():
    from matplotlib import pyplot

    before = pyplot.get_fignums()
    range_test_png({"lrs": [0.1, 1.0], "losses": [1.0, 2.0], "smoothed_losses": [1.0, 1.5]})
    memory_png({})
    assert pyplot.get_fignums() == before


def test_missing_matplotlib_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        memory_png({})


def test_none_is_drawn_as_a_gap():
    values = figure.floats([1, None, 2.5])
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 2.5


@pytest.mark.parametrize("name", ["memory", "noise_scale", "range_test", "schedule", "throughput"])
def test_docstring_examples_run(name):
    import importlib

    module = importlib.import_module(f"batchfit.plots.{name}")
    assert doctest.testmod(module).failed == 0


def test_range_test_keeps_a_curve_that_rises_above_its_start_on_the_chart(monkeypatch):
    from batchfit.plots import range_test

    figures = captured(monkeypatch, range_test)
    rising = [2.0 + 0.1 * index for index in range(50)]  # never falls: the start is the best
    range_test_png({"lrs": [10 ** (k / 10 - 4) for k in range(50)], "losses": rising,
                    "smoothed_losses": rising})  # fmt: skip
    low, high = figures[0].axes[0].get_ylim()
    shown = [loss for loss in rising if low <= loss <= high]
    assert len(shown) >= 0.9 * len(rising)


def test_range_test_still_cuts_the_blow_up_at_the_end(monkeypatch):
    from batchfit.plots import range_test

    figures = captured(monkeypatch, range_test)
    falling = [2.0 - 0.02 * index for index in range(48)] + [5.0, 40.0]
    range_test_png({"lrs": [10 ** (k / 10 - 4) for k in range(50)], "losses": falling,
                    "smoothed_losses": falling})  # fmt: skip
    low, high = figures[0].axes[0].get_ylim()
    assert low < 1.06 and 2.0 < high < 5.0


@pytest.mark.parametrize("tokens", [False, True])
def test_throughput_draws_a_line_on_every_axis(monkeypatch, tokens):
    from batchfit.plots import throughput

    figures = captured(monkeypatch, throughput)
    data = _throughput_result(tokens).to_dict()
    throughput_png({**data, "clock": "cpu"})
    axes = figures[0].axes
    assert len(axes) == (2 if tokens else 1)
    for each in axes:
        assert any(len(line.get_xdata()) == 4 for line in each.get_lines())
    assert "tokens per second" in axes[-1].get_ylabel() if tokens else True
    labels = axes[0].get_legend().get_texts()
    assert any("CPU time" in label.get_text() for label in labels)


def test_the_tokens_axis_is_the_samples_axis_times_the_tokens_per_sample(monkeypatch):
    from batchfit.plots import throughput

    figures = captured(monkeypatch, throughput)
    throughput_png(_throughput_result(True).to_dict())  # 64 tokens in every sample
    samples, tokens = figures[0].axes
    assert tokens.get_ylim() == pytest.approx(tuple(64 * limit for limit in samples.get_ylim()))
    labels = [text.get_text() for text in samples.get_legend().get_texts()]
    assert "tokens/s (right axis = samples/s x 64 tokens per sample)" in labels
    # tokens per sample that vary: the axis keeps its own scale, and the legend says so
    data = _throughput_result(True).to_dict()
    data["tokens_per_second"] = [
        rate * (40 + 8 * i) for i, rate in enumerate(data["samples_per_second"])
    ]
    throughput_png(data)
    labels = [text.get_text() for text in figures[1].axes[0].get_legend().get_texts()]
    assert "tokens/s (right axis, its own scale: 40 to 64 tokens per sample)" in labels


def test_throughput_bars_when_the_cpu_clock_reads_faster_than_every_wall_step():
    data = {**_throughput_result(False).to_dict(), "clock": "cpu"}
    data["samples_per_second"] = [rate * 2 for rate in data["samples_per_second"]]
    assert throughput_png(data).startswith(PNG)


def test_range_test_stop_marker_of_a_blow_up_is_inside_the_chart(monkeypatch):
    from batchfit.plots import range_test

    figures = captured(monkeypatch, range_test)
    falling = [2.0 - 0.02 * index for index in range(48)] + [5.0, 40.0]
    range_test_png({"lrs": [10 ** (k / 10 - 4) for k in range(50)], "losses": falling,
                    "smoothed_losses": falling, "stop_reason": "diverged"})  # fmt: skip
    axes = figures[0].axes[0]
    (stop,) = [line for line in axes.get_lines() if line.get_label() == "stopped: diverged"]
    low, high = axes.get_ylim()
    (y,) = stop.get_ydata()
    # the marker's centre sits below the top by at least half its height (9 points of 400 px)
    assert low < y < high - 0.03 * (high - low)


def test_noise_scale_far_above_the_chosen_batch_gets_a_log_axis(monkeypatch):
    from batchfit.plots import noise_scale

    figures = captured(monkeypatch, noise_scale)
    running = [
        {"batches": k, "noise_scale_samples": value, "low_samples": 0.0, "high_samples": None}
        for k, value in ((1, 28000.0), (2, 2900.0), (3, 2480.0))
    ]
    noise_scale_png({"noise_scale_samples": 2480.0, "low_samples": 800.0,
                     "high_samples": 23000.0, "running": running}, global_batch=64)  # fmt: skip
    axes = figures[0].axes[0]
    assert axes.get_yscale() == "log"
    low, high = axes.get_ylim()
    (chosen,) = [line for line in axes.get_lines() if "chosen" in line.get_label()]
    # on a linear axis from 0 to 28000, the batch of 64 lay on the floor, hidden by the x axis
    assert 0 < low < 64 and math.log(64 / low) > 0.05 * math.log(high / low)
    assert chosen.get_ydata()[0] == 64


def test_noise_scale_near_the_chosen_batch_keeps_a_linear_axis(monkeypatch):
    from batchfit.plots import noise_scale

    figures = captured(monkeypatch, noise_scale)
    noise_scale_png({"noise_scale_samples": 150.0, "low_samples": 120.0, "high_samples": 200.0,
                     "running": [{"batches": 1, "noise_scale_samples": 180.0}]},
                    global_batch=128)  # fmt: skip
    axes = figures[0].axes[0]
    assert axes.get_yscale() == "linear" and axes.get_ylim()[0] == 0


def test_noise_scale_marks_the_value_a_plan_extrapolated_to(monkeypatch):
    from batchfit.plots import noise_scale

    figures = captured(monkeypatch, noise_scale)
    noise_scale_png({"noise_scale_samples": 150.0, "low_samples": 120.0, "high_samples": 200.0,
                     "running": [{"batches": 1, "noise_scale_samples": 180.0}]},
                    global_batch=128, planned_for=(700.0, 7190))  # fmt: skip
    axes = figures[0].axes[0]
    (planned,) = [line for line in axes.get_lines() if line.get_label().startswith("planned")]
    assert planned.get_ydata()[0] == 700.0 and "7,190 samples" in planned.get_label()
    assert axes.get_ylim()[1] > 700.0


def test_memory_far_below_the_budget_gets_a_log_axis(monkeypatch):
    from batchfit.plots import memory

    figures = captured(monkeypatch, memory)
    # the cnn example planned for an A100-80GB: peaks up to 680 MiB under a budget of 80 GiB
    data = {"probes": [[2, 929280], [512, 178469888], [2048, 713255936]], "trials": [],
            "fixed_bytes": 208018.0, "per_sample_bytes": 348168.0,
            "capacity_bytes": 80 * 2**30, "limit_batch": 2048}  # fmt: skip
    memory_png(data)
    axes = figures[0].axes[0]
    assert axes.get_yscale() == "log"
    (fit,) = [line for line in axes.get_lines() if line.get_label().startswith("fit")]
    # drawn through many points, so the straight fit stays straight where it is read
    assert len(fit.get_xdata()) > 10 and fit.get_ydata()[-1] > 100 * fit.get_ydata()[0] > 0
    memory_png({**data, "capacity_bytes": 2**30})
    assert figures[1].axes[0].get_yscale() == "linear"


def test_throughput_limit_past_the_timed_batches_is_named_and_ticked(monkeypatch):
    from batchfit.plots import throughput

    figures = captured(monkeypatch, throughput)
    # the cnn example stopped timing at 32 (no gain), its limit the 2048 training samples
    rates = [1089.0, 1315.0, 1842.0, 2361.0, 1656.0, 1716.0]
    throughput_png({"batch_sizes": [1, 2, 4, 8, 16, 32], "knee_batch": 8,
                    "samples_per_second": rates, "limit_batch": 2048, "limit_reason": "dataset",
                    "stopped_early": True})  # fmt: skip
    axes = figures[0].axes[0]
    assert 2048 in axes.get_xticks() and "2048" in [t.get_text() for t in axes.get_xticklabels()]
    assert "limit 2048 (dataset)" in [t.get_text() for t in axes.get_legend().get_texts()]


def test_noise_scale_axis_counts_micro_batches_when_whole_passes_were_measured(monkeypatch):
    from batchfit.plots import noise_scale

    figures = captured(monkeypatch, noise_scale)
    point = {"noise_scale_samples": 149.0, "low_samples": 129.0, "high_samples": 167.0,
             "running": [{"batches": 179, "noise_scale_samples": 149.0}]}  # fmt: skip
    # digits: 179 micro-batches of 8 in one pass of 1432 samples, not 179 batches of 1432
    noise_scale_png({**point, "whole_passes": 1, "micro_batch": 8, "big_batch_samples": 1432})
    assert figures[0].axes[0].get_xlabel() == (
        "micro-batches of 8 measured (1 pass over the training set)"
    )
    noise_scale_png({**point, "whole_passes": 0, "micro_batch": 4, "big_batch_samples": 64})
    assert figures[1].axes[0].get_xlabel() == "big batches measured"


def test_memory_draws_the_usable_line_the_limit_is_found_under(monkeypatch):
    from batchfit.plots import memory

    figures = captured(monkeypatch, memory)
    # a small LM under --memory-budget 40MiB: limit 28, where the fit meets 38 MiB, not 40
    memory_png({"probes": [[2, 4136960], [28, 38721536]], "trials": [],
                "fixed_bytes": 1478257.0, "per_sample_bytes": 1330144.0, "limit_batch": 28,
                "capacity_bytes": 40 * 2**20, "usable_bytes": 38 * 2**20, "margin": 0.05,
                "reserve_bytes": 0})  # fmt: skip
    axes = figures[0].axes[0]
    (usable,) = [line for line in axes.get_lines() if line.get_label().startswith("usable")]
    assert usable.get_ydata()[0] == 38.0
    assert usable.get_label() == "usable: 38.00 MiB (budget less 5% margin)"


def test_memory_a_decade_below_the_budget_gets_a_log_axis(monkeypatch):
    from batchfit.plots import memory

    figures = captured(monkeypatch, memory)
    # the cnn example under --memory-budget 12GiB: peaks up to 800 MiB, in the bottom 6%
    memory_png({"probes": [[2, 929280], [1290, 449345024]], "trials": [],
                "fixed_bytes": 208018.0, "per_sample_bytes": 348168.0,
                "capacity_bytes": 12 * 2**30, "limit_batch": 2048})  # fmt: skip
    assert figures[0].axes[0].get_yscale() == "log"


def test_range_test_of_an_inconclusive_sweep_says_so_on_the_picture(monkeypatch):
    from batchfit.plots import range_test

    figures = captured(monkeypatch, range_test)
    falling = [2.0 - 0.02 * index for index in range(50)]  # never turned: no rate to take
    data = {"lrs": [10 ** (k / 10 - 4) for k in range(50)], "losses": falling,
            "smoothed_losses": falling, "steepest_index": 45, "valley_index": 25}  # fmt: skip
    range_test_png({**data, "inconclusive_reason": "it did not diverge"}, title="digits")
    range_test_png({**data, "inconclusive_reason": None}, title="digits")
    inconclusive, conclusive = (figure.axes[0].get_title() for figure in figures)
    assert inconclusive.startswith("digits\ninconclusive: take no rate from it")
    assert conclusive == "digits"


def test_memory_marks_the_limit_under_a_budget_and_the_chosen_micro_batch(monkeypatch):
    from batchfit.plots import memory

    figures = captured(monkeypatch, memory)
    # `batchfit plan --example digits --quick --memory-budget 4MiB`: "all 128 fit in memory
    # (limit 676 with a 5% margin, confirmed)"; the figure named neither number
    data = {"probes": [[2, 1891840], [676, 3983872]], "fixed_bytes": 1169199.0,
            "per_sample_bytes": 4120.8, "limit_batch": 676, "capacity_bytes": 4 * 2**20,
            "trials": [{"batch_size": 676, "fits": True, "measured_bytes": 3983872}]}  # fmt: skip
    memory_png(data, micro_batch=128)
    memory_png({**data, "capacity_bytes": None, "trials": []}, micro_batch=128)  # on the CPU
    budget, cpu = ({line.get_label(): line for line in f.axes[0].get_lines()} for f in figures)
    assert list(budget["limit 676"].get_xdata()) == [676, 676]
    assert list(budget["chosen micro-batch 128"].get_xdata()) == [128, 128]
    assert "chosen micro-batch 128" in cpu  # the training set's size is no memory limit
    assert not any(label.startswith("limit") for label in cpu)
