"""The sweep plots draw the shape of SweepResult.to_dict()."""

from __future__ import annotations

from batchfit.plots.sweep import sweep_rates_png, sweep_steps_png

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
