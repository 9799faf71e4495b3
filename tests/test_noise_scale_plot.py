"""Tests of batchfit.noise_scale_plot."""

from __future__ import annotations

import pytest

from batchfit.errors import ConfigError
from batchfit.noise_measure import measure_noise_scale
from batchfit.noise_scale import NoiseScaleTracker
from batchfit.noise_scale_plot import plot_noise_scale
from tests.conftest import make_mlp_task


def test_plot_writes_a_png_and_leaves_no_temporary_file(tmp_path):
    result = measure_noise_scale(make_mlp_task(), batches=8, warmup_steps=2, device="cpu")
    path = plot_noise_scale(result, tmp_path / "plots" / "noise.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["noise.png"]


def test_plot_refuses_other_formats_and_results_without_running_points(tmp_path):
    result = measure_noise_scale(make_mlp_task(), batches=3, warmup_steps=0, device="cpu")
    with pytest.raises(ConfigError, match=r"\.png"):
        plot_noise_scale(result, tmp_path / "noise.svg")
    tracker = NoiseScaleTracker()
    tracker.update(5.0, 2.0, small_batch=2, big_batch=8)
    with pytest.raises(ConfigError, match="no running estimate"):
        plot_noise_scale(tracker.estimate(), tmp_path / "noise.png")
