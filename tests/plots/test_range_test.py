"""The range-test plot's loss axis."""

from __future__ import annotations

from batchfit.plots import range_test
from batchfit.plots.range_test import range_test_png
from tests.plots.capture import captured


def test_a_loss_that_blew_up_at_once_gets_a_log_axis_with_its_start_on_it(monkeypatch):
    # `batchfit lr-range --example digits --start-lr 1000 --end-lr 10000`: 2 steps, 2.29 then
    # 1.6e13; on a linear axis from -4e11 the start read as 0
    figures = captured(monkeypatch, range_test)
    range_test_png({"lrs": [1000.0, 1023.5], "losses": [2.2896, 1.6324e13],
                    "smoothed_losses": [2.2896, 8.3714e12], "stop_reason": "diverged",
                    "inconclusive_reason": "the smoothed loss never fell"})  # fmt: skip
    axes = figures[0].axes[0]
    low, high = axes.get_ylim()
    assert axes.get_yscale() == "log"
    assert 0 < low < 2.2896 and 8.3714e12 < high
    (stop,) = [line for line in axes.get_lines() if line.get_label() == "stopped: diverged"]
    assert low < stop.get_ydata()[0] < high


def test_an_ordinary_sweep_keeps_a_linear_axis(monkeypatch):
    figures = captured(monkeypatch, range_test)
    falling = [2.3 - 0.02 * index for index in range(48)] + [5.0, 40.0]
    range_test_png({"lrs": [10 ** (k / 10 - 7) for k in range(50)], "losses": falling,
                    "smoothed_losses": falling, "stop_reason": "diverged"})  # fmt: skip
    assert figures[0].axes[0].get_yscale() == "linear"


def test_a_sweep_without_a_finite_loss_says_so_and_lists_no_loss_line(monkeypatch):
    # The chart was blank while its legend still listed "loss" and "smoothed loss".
    figures = captured(monkeypatch, range_test)
    nan = float("nan")
    range_test_png({"lrs": [0.01, 0.1], "losses": [nan, nan], "smoothed_losses": [None, None]})
    (axes,) = figures[0].axes
    labels = axes.get_legend_handles_labels()[1]
    assert "loss" not in labels and "smoothed loss" not in labels
    assert [text.get_text() for text in axes.texts] == ["nothing to draw: no finite loss"]
