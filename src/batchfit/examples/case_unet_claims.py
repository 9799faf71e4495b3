"""The guide's claims about its U-Net case, judged from the case's numbers by fixed rules."""

from __future__ import annotations

from batchfit.examples.case_unet_result import (
    GUIDE_IOU_GAIN,
    ArmSummary,
    Claim,
    MemoryComparison,
)

__all__ = ["SIZE_CLOSE", "SIZE_ROUGH", "judge_claims"]

SIZE_CLOSE, SIZE_ROUGH = 0.1, 0.3
"""A memory figure of the guide "held" within 10% of batchfit's, "roughly" within 30%."""


def _verdict(held: bool) -> str:
    return "held" if held else "did not hold"


def _size_verdict(value: float, claimed: float) -> str:
    """ "held" within SIZE_CLOSE of the guide's figure, "roughly" within SIZE_ROUGH."""
    off = abs(value / claimed - 1)
    return "held" if off <= SIZE_CLOSE else "roughly" if off <= SIZE_ROUGH else "did not hold"


IOU_CLAIMS = ("IoU improves by 5%", "accumulation calms the IoU")
"""The claims judged from the validation IoU of the two arms (with the noisy-IoU claim)."""


def judge_claims(memory: MemoryComparison, arms: tuple[ArmSummary, ...]) -> tuple[Claim, ...]:
    """Each of the guide's claims, judged from the numbers by fixed rules (stated per claim).

    Returns:
        The memory claims always; the training claims when arms "b16" and "b64-accum" ran.
    """
    by_name = {arm.arm: arm for arm in arms}
    small, accumulated = by_name.get("b16"), by_name.get("b64-accum")
    rule = f"held within {SIZE_CLOSE:.0%}, roughly within {SIZE_ROUGH:.0%}"
    claims = [
        Claim(
            "the model takes 3 GB",
            _size_verdict(memory.state_bytes, memory.guide_model_bytes),
            f"{memory.state_bytes / 1e9:.2f} GB: fp32 weights, gradients and Adam's moments "
            f"({rule})",
        ),
        Claim(
            "each image takes about 0.5 GB",
            _size_verdict(memory.per_image_bytes, memory.guide_per_image_bytes),
            f"{memory.per_image_bytes / 1e9:.2f} GB per {memory.image_size}x{memory.image_size} "
            f"image ({rule})",
        ),
        Claim(
            "at most 18 fit",
            _verdict(memory.limit_batch == memory.guide_limit_batch),
            f"{memory.limit_batch} fit after the CUDA reserve and margin "
            f"({memory.formula_limit_batch} with nothing kept free)",
        ),
        Claim(
            "16 (a power of two) is chosen",
            _verdict(memory.batch == memory.guide_batch),
            f"the largest power of two that fits is {memory.batch}",
        ),
    ]
    if small is None or accumulated is None:
        return tuple(claims)
    learned = small.iou_mean > 0 and accumulated.iou_mean > 0
    unlearned = (
        f"IoU {small.iou_mean:.4f} at 16 and {accumulated.iou_mean:.4f} at 64: the runs have "
        "not learned to segment yet, so there is no IoU to compare (train more epochs)"
    )
    claims.append(
        Claim(
            "validation IoU fluctuates a lot at batch 16",
            _verdict(small.iou_noisy_runs * 2 > small.seeds) if learned else "cannot tell",
            f"the monitor calls the IoU noisy in {small.iou_noisy_runs} of {small.seeds} runs; "
            f"IoU std over the last evaluations {small.iou_std:.4f} (held: most runs noisy)"
            if learned
            else unlearned,
        )
    )
    if small.loss_spread is not None and accumulated.loss_spread is not None:
        fair = (
            ""
            if small.loss_spread_64 is None or accumulated.loss_spread_64 is None
            else f"; over means of 64 samples {small.loss_spread_64:.3f} vs "
            f"{accumulated.loss_spread_64:.3f}"
        )
        claims.append(
            Claim(
                "accumulating to 64 at 4x the rate makes the loss curve smoother",
                _verdict(accumulated.loss_spread < small.loss_spread),
                f"loss spread per step {small.loss_spread:.3f} at 16 vs "
                f"{accumulated.loss_spread:.3f} at 64{fair} (held: lower per step)",
            )
        )
    if not learned:
        claims += [Claim(words, "cannot tell", unlearned) for words in IOU_CLAIMS]
        return tuple(claims)
    gain = accumulated.iou_mean / small.iou_mean - 1
    separated = accumulated.iou_low > small.iou_high
    claims.append(
        Claim(
            "IoU improves by 5%",
            _verdict(gain >= GUIDE_IOU_GAIN and separated),
            f"IoU {small.iou_mean:.4f} at 16 vs {accumulated.iou_mean:.4f} at 64: {gain:+.1%} "
            f"(held: +{GUIDE_IOU_GAIN:.0%} or more and the seed ranges apart)",
        )
    )
    claims.append(
        Claim(
            "accumulation calms the IoU",
            _verdict(accumulated.iou_std < small.iou_std),
            f"IoU std over the last evaluations {small.iou_std:.4f} at 16 vs "
            f"{accumulated.iou_std:.4f} at 64 (held: lower at 64)",
        )
    )
    return tuple(claims)
