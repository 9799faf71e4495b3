"""The Hugging Face callback under fp16 on a real CUDA card, with the Trainer's own GradScaler.

`gpu`-marked: skipped where CUDA is absent (tests/integrations/test_transformers.py puts a
GradScaler in by hand to check the same on the CPU).
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from batchfit.integrations.transformers import (  # noqa: E402
    NoiseScaleTrainerCallback,
    apply_plan,
)
from tests.integrations.test_transformers import _args, _plan, tiny_gpt2, token_data  # noqa: E402

pytestmark = pytest.mark.gpu


def _trained(tmp_path, **precision):
    """A tiny GPT-2 trained 3 steps on the card with the noise-scale callback."""
    callback = NoiseScaleTrainerCallback(window=None, diagnosis=False)
    args = _args(tmp_path, use_cpu=False, max_grad_norm=0.0, max_steps=3, **precision)
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=apply_plan(args, _plan(device="cuda")),
        train_dataset=token_data(),
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback.tracker


def test_under_fp16_on_cuda_the_noise_scale_terms_match_full_precision(tmp_path):
    trainer, fp16 = _trained(tmp_path / "fp16", fp16=True)
    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler.get_scale() > 1  # the Trainer's own loss scale
    _, fp32 = _trained(tmp_path / "fp32")
    assert fp16.updates == fp32.updates == 3
    # Without the scale taken out, both came out scale^2 (about 4e9) times too large.
    assert fp16.trace_covariance == pytest.approx(fp32.trace_covariance, rel=0.05)
    # |G|^2 is a difference of two terms near zero this early (on an H200: -0.011 in fp16,
    # -0.017 in fp32, where the trace is about 10): the same to 1% of the trace.
    assert abs(fp16.gradient_sq_norm - fp32.gradient_sq_norm) <= 0.01 * fp32.trace_covariance
