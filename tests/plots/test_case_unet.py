"""The worked case's IoU plots keep to the range an IoU can take."""

from __future__ import annotations

import pytest

from batchfit.plots import case_unet
from batchfit.plots.case_unet import case_iou_png
from tests.plots.capture import captured


@pytest.mark.parametrize("zoom", [False, True])
def test_iou_axis_stays_within_zero_and_one(monkeypatch, zoom):
    # `batchfit case unet --seeds 1 --epochs 1`: no run has learned yet, every IoU is 0
    figures = captured(monkeypatch, case_unet)
    curves = [{"arm": arm, "seed": 0, "samples": [16], "loss": [0.7],
               "iou_samples": [128, 256, 384, 512], "iou": [0.0] * 4}
              for arm in ("b16", "b64-accum", "plan")]  # fmt: skip
    case_iou_png(curves, zoom=zoom)
    case_iou_png([{**curves[0], "iou": [0.97, 0.99, 1.0, 1.0]}], zoom=zoom)
    for figure in figures:
        low, high = figure.axes[0].get_ylim()
        assert 0.0 <= low < high <= 1.0
