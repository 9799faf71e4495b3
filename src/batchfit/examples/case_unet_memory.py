"""The U-Net case's memory part: the guide's arithmetic next to batchfit's prediction.

The guide: "a single GPU with 12GB VRAM, input size 256x256; the model itself uses 3GB, leaving
9GB; each image uses approximately 0.5GB -> maximum batch size ~18 -> choose 16 (a power of 2)".
`compare_memory` answers the same question for the classic U-Net
(`batchfit.examples.unet_standard`) with fake tensors, and says where the two differ.
"""

from __future__ import annotations

import time

from batchfit.errors import ConfigError
from batchfit.examples.case_unet_result import MemoryComparison

__all__ = ["CARD", "IMAGE_SIZE", "compare_memory"]

CARD = "12GiB"
"""The guide's card: "a single GPU with 12GB VRAM"."""

IMAGE_SIZE = 256
"""The guide's input size, 256x256, for the memory part."""

GUIDE_CARD_BYTES, GUIDE_MODEL_BYTES, GUIDE_PER_IMAGE_BYTES = 12 * 10**9, 3 * 10**9, 5 * 10**8
"""The guide's 12 GB card, 3 GB model and 0.5 GB per image (decimal units, as written)."""


def compare_memory(
    *, image_size: int = IMAGE_SIZE, card: str = CARD, margin: float = 0.05
) -> MemoryComparison:
    """The guide's 3 GB / 0.5 GB / 18 / 16 next to batchfit's prediction for the classic U-Net.

    Fake tensors only (`confirm="never"`): nothing is allocated, so this runs in seconds on any
    machine.

    Args:
        image_size: predict for image_size x image_size images.
        card: the memory budget ("12GiB").
        margin: batchfit's margin (its default 5%).

    Returns:
        The MemoryComparison.
    """
    from batchfit.examples.unet_standard import standard_unet_task
    from batchfit.memory.cards import memory_target
    from batchfit.memory.model import max_batch_size
    from batchfit.memory.predict import predict_step_memory
    from batchfit.memory.search import find_max_batch_size

    started = time.perf_counter()
    task = standard_unet_task(image_size)
    result = find_max_batch_size(
        task, device="cpu", memory_budget=card, confirm="never", round_to="pow2", margin=margin
    )
    line = result.memory_model
    if line is None:  # fake mode always runs this plain torch model; guard the invariant
        raise ConfigError(f"no memory model for {task.name}; the prediction failed.")
    peak = predict_step_memory(task, result.batch_size).peak_bytes
    capacity = memory_target(card).memory_bytes
    guide_limit = max_batch_size(GUIDE_CARD_BYTES, GUIDE_MODEL_BYTES, GUIDE_PER_IMAGE_BYTES)
    return MemoryComparison(
        model="classic U-Net (4 levels, 64-1024 channels, BatchNorm), 1 input channel",
        parameters=sum(p.numel() for p in task.make_model().parameters()),
        image_size=image_size,
        precision="32",
        card_bytes=capacity,
        guide_card_bytes=GUIDE_CARD_BYTES,
        guide_model_bytes=GUIDE_MODEL_BYTES,
        guide_per_image_bytes=GUIDE_PER_IMAGE_BYTES,
        guide_limit_batch=guide_limit,
        guide_batch=max_batch_size(
            GUIDE_CARD_BYTES, GUIDE_MODEL_BYTES, GUIDE_PER_IMAGE_BYTES, round_to="pow2"
        ),
        state_bytes=result.state_bytes,
        fixed_bytes=line.fixed_bytes,
        per_image_bytes=line.per_sample_bytes,
        reserve_bytes=result.reserve_bytes,
        margin=result.margin,
        usable_bytes=result.usable_bytes,
        limit_batch=result.limit_batch_size,
        batch=result.batch_size,
        peak_bytes_at_batch=peak,
        formula_limit_batch=line.max_batch_size(capacity),
        seconds=time.perf_counter() - started,
    )
