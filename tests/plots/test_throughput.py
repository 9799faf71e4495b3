"""The throughput plot marks a knee only where the read-out names one."""

from __future__ import annotations

from batchfit.plots import throughput
from batchfit.plots.throughput import throughput_png
from tests.plots.capture import captured


def _labels(figure):
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_one_size_timed_marks_no_knee(monkeypatch):
    # `batchfit throughput --example digits --batch-sizes 16`: "a knee needs several"
    figures = captured(monkeypatch, throughput)
    throughput_png({"batch_sizes": [16], "samples_per_second": [31558.0], "knee_batch": 16,
                    "best_batch": 16, "fraction": 0.9})  # fmt: skip
    axes = figures[0].axes[0]
    assert not any(label.startswith(("knee", "90%")) for label in _labels(figures[0]))
    assert [line.get_marker() for line in axes.get_lines()] == ["o"]


def test_a_knee_at_the_largest_size_timed_may_lie_beyond(monkeypatch):
    figures = captured(monkeypatch, throughput)
    data = {"batch_sizes": [8, 16, 32], "samples_per_second": [100.0, 200.0, 400.0],
            "knee_batch": 32, "best_batch": 32, "fraction": 0.9}  # fmt: skip
    throughput_png(data)
    throughput_png({**data, "samples_per_second": [100.0, 390.0, 400.0], "knee_batch": 16})
    still_rising, found = (_labels(figure) for figure in figures)
    assert "knee: 32 or beyond (still rising)" in still_rising
    assert "knee: 16" in found and "90% of best" in found


def test_the_chosen_batch_is_marked_and_ticked(monkeypatch):
    figures = captured(monkeypatch, throughput)
    data = {"batch_sizes": [8, 16, 32, 64], "samples_per_second": [100.0, 190.0, 330.0, 360.0],
            "knee_batch": 32, "best_batch": 64, "fraction": 0.9}  # fmt: skip
    throughput_png(data, chosen=(48, "chosen global batch 48"))
    axes = figures[0].axes[0]
    (line,) = [line for line in axes.get_lines() if line.get_label() == "chosen global batch 48"]
    assert list(line.get_xdata()) == [48, 48]
    assert "48" in [tick.get_text() for tick in axes.get_xticklabels()]
