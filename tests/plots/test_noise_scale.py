"""The noise-scale plot says what the table says about the estimate it draws."""

from __future__ import annotations

import warnings

from batchfit.plots import noise_scale
from batchfit.plots.noise_scale import noise_scale_png
from tests.plots.capture import captured

# `batchfit noise-scale --example digits --batches 2 --big-batch 16`: one running point at 85,
# the table's "not yet reliable: only 2 batch(es) measured"
UNRELIABLE = {
    "noise_scale_samples": None, "low_samples": None, "high_samples": None,
    "confidence": 0.9, "reliable": False, "reason": "only 2 batch(es) measured",
    "small_batch_samples": 8.0, "big_batch_samples": 16.0, "step": 50,
    "running": [{"batches": 2, "noise_scale_samples": 85.0, "low_samples": 20.0,
                 "high_samples": None}],
}  # fmt: skip


def test_an_estimate_not_yet_reliable_says_so_in_the_title(monkeypatch):
    figures = captured(monkeypatch, noise_scale)
    noise_scale_png(UNRELIABLE)
    reliable = {**UNRELIABLE, "reliable": True, "reason": "", "noise_scale_samples": 85.0}
    noise_scale_png(reliable)
    unsure, sure = (figure.axes[0].get_title() for figure in figures)
    assert unsure == (
        "Gradient noise scale (B_small 8, B_big 16, step 50)\n"
        "not yet reliable: take no batch from it (see the reason)"
    )
    assert sure == "Gradient noise scale (B_small 8, B_big 16, step 50)"


def test_batches_measured_are_ticked_in_whole_numbers(monkeypatch):
    figures = captured(monkeypatch, noise_scale)
    noise_scale_png(UNRELIABLE)
    axes = figures[0].axes[0]
    low, high = axes.get_xlim()
    assert all(tick == int(tick) for tick in axes.get_xticks() if low <= tick <= high)


def test_nothing_to_draw_leaves_no_empty_legend(monkeypatch):
    figures = captured(monkeypatch, noise_scale)
    empty = {**UNRELIABLE, "running": [{"batches": 1, "noise_scale_samples": None}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing to list
        noise_scale_png(empty)
    assert figures[0].axes[0].get_legend() is None
    assert "not yet reliable" in figures[0].axes[0].get_title()
