"""The sweep plots draw the shape of SweepResult.to_dict()."""

from __future__ import annotations

from batchfit.plots.sweep import sweep_rates_png, sweep_steps_png
from tests.plots.capture import captured

DATA = {
    "target": "val_accuracy>=0.9",
    "points": [
        {"batch": 8, "steps": 100.0, "steps_low": 90, "steps_high": 110, "best_lr": 0.001,
         "scaled_lr": 0.001},
        {"batch": 16, "steps": 55.0, "steps_low": 50, "steps_high": 60, "best_lr": 0.002,
         "scaled_lr": 0.0014},
        {"batch": 32, "steps": None, "steps_low": None, "steps_high": None, "best_lr": None,
         "scaled_lr": 0.002},
    ],
    "fit": {"min_steps": 10.0, "min_samples": 720.0, "critical_batch": 72.0},
    "noise_scale": {"noise_scale_samples": 60.0},
    "lr_exponent": 1.0,
    "lr_rule": "sqrt",
}  # fmt: skip


def test_steps_and_rates_plots_are_pngs():
    assert sweep_steps_png(DATA)[:4] == b"\x89PNG"
    assert sweep_rates_png(DATA)[:4] == b"\x89PNG"


def test_plots_without_a_fit_or_points():
    assert sweep_steps_png({"points": [], "fit": None})[:4] == b"\x89PNG"
    assert sweep_rates_png({"points": []})[:4] == b"\x89PNG"


def _captured(monkeypatch):
    from batchfit.plots import sweep

    return captured(monkeypatch, sweep)


def test_axes_are_labelled_in_plain_numbers(monkeypatch):
    figures = _captured(monkeypatch)
    sweep_steps_png(DATA)
    sweep_rates_png(DATA)
    # the steps chart shows the batches that reached the target; the rates chart every batch
    for figure, batches in zip(figures, (["8", "16"], ["8", "16", "32"])):
        figure.canvas.draw()
        axes = figure.axes[0]
        assert axes.get_xscale() == "log" and axes.get_yscale() == "log"
        x = [t.get_text() for t in axes.get_xticklabels() if t.get_text()]
        assert x == batches  # each batch, not 2^3, 2^4, 2^5
        y = [t.get_text() for t in axes.get_yticklabels() + axes.get_yticklabels(minor=True)]
        shown = [text for text in y if text]
        assert shown and all("10^" not in t and "times" not in t for t in shown)
        assert all(float(text) > 0 for text in shown)  # plain numbers: "50", "0.002"


def test_the_critical_batch_reads_as_in_the_table(monkeypatch):
    figures = _captured(monkeypatch)
    sweep_steps_png({**DATA, "fit": {**DATA["fit"], "critical_batch": 64.5}})
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    # the sweep's table rounds B_crit to whole samples (64); the chart said 64.5
    assert "B_crit = 64 (at or past the largest batch, 16)" in labels


def test_a_best_rate_at_the_edge_of_the_rates_tried_is_marked(monkeypatch):
    figures = _captured(monkeypatch)
    points = [
        {**DATA["points"][0], "rates": [0.0003, 0.001, 0.003]},  # inside: not marked
        {**DATA["points"][1], "rates": [0.0007, 0.0014, 0.002]},  # best 0.002: the highest
    ]
    sweep_rates_png({**DATA, "points": points})
    axes = figures[0].axes[0]
    lines = dict(zip(axes.get_legend_handles_labels()[1], axes.get_legend_handles_labels()[0]))
    marked = lines["best at the highest rate tried (a better one may lie beyond)"]
    assert list(marked.get_xdata()) == [16] and list(marked.get_ydata()) == [0.002]
    assert not any("lowest" in label for label in lines)


def test_a_batch_that_never_reached_the_target_is_drawn_at_its_cap(monkeypatch):
    figures = _captured(monkeypatch)
    trials = [{"batch": 32, "cap_steps": 40}, {"batch": 32, "cap_steps": 25}]
    trials += [{"batch": 8, "cap_steps": 300}]
    sweep_steps_png({**DATA, "trials": trials})
    axes = figures[0].axes[0]
    lines = dict(zip(axes.get_legend_handles_labels()[1], axes.get_legend_handles_labels()[0]))
    marked = lines["not reached within the step cap (left out of the fit)"]
    assert list(marked.get_xdata()) == [32] and list(marked.get_ydata()) == [40]
    figures[0].canvas.draw()
    assert [t.get_text() for t in axes.get_xticklabels() if t.get_text()] == ["8", "16", "32"]


def test_the_fit_and_noise_scale_read_as_in_the_table(monkeypatch):
    figures = _captured(monkeypatch)
    fit = {"min_steps": 9.19, "min_samples": 1312.4, "critical_batch": 142.8}
    sweep_steps_png({**DATA, "fit": fit, "noise_scale": {"noise_scale_samples": 133.9}})
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    # the table says S_min 9.2, E_min 1,312 and noise scale 134; the chart said 1.31e+03, 133.9
    assert "S_min + E_min/B (S_min 9.2, E_min 1,312)" in labels
    assert "noise scale 134" in labels
    assert "B_crit = 143 (at or past the largest batch, 16)" in labels


def test_no_best_rate_when_no_batch_reached_the_target(monkeypatch):
    # `batchfit sweep --example digits --target "val_accuracy>=0.999" --max-epochs 1`: the
    # legend listed "best rate" over an empty chart but for the rule's line
    figures = _captured(monkeypatch)
    missed = [{**point, "steps": None, "best_lr": None} for point in DATA["points"]]
    sweep_rates_png({**DATA, "points": missed, "lr_exponent": None})
    axes = figures[0].axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["sqrt-scaled rate (grid centre)"]
    assert [line.get_label() for line in axes.get_lines()] == labels


def test_a_critical_batch_outside_the_batches_measured_says_so_in_the_legend(monkeypatch):
    # `batchfit sweep --example digits --target "val_accuracy>=0.9" --batch-sizes 32,128`:
    # "Critical batch about 333 samples, at or beyond the largest batch measured (128)"
    figures = _captured(monkeypatch)
    for critical in (333.0, 4.0, 12.0):
        fit = {**DATA["fit"], "critical_batch": critical}
        sweep_steps_png({**DATA, "fit": fit})
    labels = [
        [t.get_text() for t in figure.axes[0].get_legend().get_texts() if "B_crit" in t.get_text()]
        for figure in figures
    ]
    assert labels == [
        ["B_crit = 333 (at or past the largest batch, 16)"],
        ["B_crit = 4 (below the smallest batch, 8)"],
        ["B_crit = 12"],
    ]
