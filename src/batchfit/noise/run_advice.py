"""Whether a training run can log the gradient noise scale, and what its last value says about
the run's global batch: the words `batchfit train` prints and its `--json` carries.
"""

from __future__ import annotations

__all__ = ["noise_scale_advice", "noise_scale_loggable"]


def noise_scale_loggable(
    global_batch: int, micro_batch: int, *, dataset_size: int, world_size: int = 1
) -> tuple[bool, str]:
    """Whether a training run can log the gradient noise scale, and how (or why not).

    With two or more pieces per step (micro-batches or ranks) each piece's gradient is a small
    batch and the step's accumulated gradient the big one. With one micro-batch on one process,
    consecutive steps are paired instead (`GradientNormWatch`, "consecutive_steps"; its bias is
    stated in `batchfit.noise.watch`). A global batch larger than the training set repeats
    samples, which the estimator does not model.

    Args:
        global_batch: samples per optimizer step, over all ranks.
        micro_batch: samples per forward/backward on one rank.
        dataset_size: training samples.
        world_size: data-parallel ranks.

    Returns:
        (loggable, reason): the reason is a short phrase for people and `--json`.

    Example:
        >>> noise_scale_loggable(64, 32, dataset_size=1000)
        (True, '2 micro-batches per step')
        >>> noise_scale_loggable(32, 32, dataset_size=1000)
        (True, 'one micro-batch per step: consecutive steps are paired')
        >>> noise_scale_loggable(2000, 32, dataset_size=1000)[0]
        False
    """
    world_size = max(1, world_size)
    pieces = -(-global_batch // (micro_batch * world_size)) * world_size
    if global_batch > dataset_size:
        return False, (
            f"the global batch ({global_batch}) is larger than the training set "
            f"({dataset_size} samples)"
        )
    if pieces < 2:
        return True, "one micro-batch per step: consecutive steps are paired"
    ranks = f" over {world_size} ranks" if world_size > 1 else ""
    return True, f"{pieces} micro-batches per step{ranks}"


def noise_scale_advice(
    noise_scale: float | None,
    global_batch: int,
    *,
    dataset_size: int | None = None,
    held: str | None = None,
    overfits: bool = False,
) -> str:
    """What the noise scale at the end of a run says about its global batch, in one sentence.

    Args:
        noise_scale: the tracker's estimate (samples), or None when not yet reliable.
        global_batch: the run's samples per optimizer step.
        dataset_size: training samples, when known: a larger batch is offered only while it
            stays within a quarter of them (the plan's cap, 4 optimizer steps per epoch).
        held: why the noise scale is not read against the batch at all, as the run's
            diagnosis says it (`batchfit.monitor.diagnose.batch_not_judged`: "the run is
            diverging"), or None.
        overfits: the run's diagnosis found overfitting, whose advice is a smaller batch: a
            larger one is not offered.

    Returns:
        The sentence, e.g. "noise scale at the end: ~900 samples, well above the global batch:
        a larger global batch would now save steps".

    Example:
        >>> noise_scale_advice(60.0, 64)
        'noise scale at the end: ~60 samples, close to the global batch'
        >>> noise_scale_advice(561.0, 256, dataset_size=1438)
        'noise scale at the end: ~561 samples, well above the global batch, which is already near a quarter of the 1438 training samples'
        >>> noise_scale_advice(44.0, 256, held="the run is diverging")
        'noise scale at the end: ~44 samples, not read against the global batch: the run is diverging'
        >>> noise_scale_advice(None, 64)
        'noise scale: not yet reliable at the end of the run'
    """  # noqa: E501
    from batchfit.training.batch_growth import data_batch_limit

    if noise_scale is None:
        return "noise scale: not yet reliable at the end of the run"
    if held is not None:
        advice = f"not read against the global batch: {held}"
    elif noise_scale > 2 * global_batch and overfits:
        advice = (
            "well above the global batch, but the run overfits: a larger batch is not advised "
            "until that is fixed"
        )
    elif noise_scale > 2 * global_batch:
        room = dataset_size is None or 2 * global_batch <= data_batch_limit(dataset_size)
        advice = (
            "well above the global batch: a larger global batch would now save steps"
            if room
            else "well above the global batch, which is already near a quarter of the "
            f"{dataset_size} training samples"
        )
    elif noise_scale < global_batch / 2:
        advice = "well below the global batch: part of each batch adds little"
    else:
        advice = "close to the global batch"
    return f"noise scale at the end: ~{noise_scale:.0f} samples, {advice}"
