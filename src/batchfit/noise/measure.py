"""Measure the gradient noise scale of a task before training it.

The standalone measurement: warm a fresh model up (or load a checkpoint), freeze it, and take
pairs of small- and big-batch gradient norms over batches drawn without replacement. The
estimator maths and the smoothing live in `batchfit.noise.estimator` (McCandlish et al. 2018,
arXiv:1812.06162, Appendix A); this module only feeds a `NoiseScaleTracker`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from batchfit.errors import CheckpointError, ConfigError, TaskError
from batchfit.noise.estimator import NoiseScaleTracker
from batchfit.noise.result import NoiseScaleResult
from batchfit.progress import ProgressFn, report
from batchfit.task import check_task, scalar_loss
from batchfit.validation import check_whole_number

if TYPE_CHECKING:
    import os

    import torch
    from torch import nn

    from batchfit.task import Task

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_WARMUP_STEPS",
    "default_batch_sizes",
    "measure_noise_scale",
    "measure_noise_scales",
]

DEFAULT_BATCHES = 50
DEFAULT_WARMUP_STEPS = 50
MAX_WHOLE_PASSES = 10
"""A training set small enough that a pass over it costs no more than the big batches asked for
is measured in as many whole passes as cost no more than them, at most this many
(`whole_passes`)."""
MIN_PASS_MICRO_BATCHES = 8
"""Whole passes are measured only where a pass holds at least this many small batches: the
pairs the estimate and its interval rest on."""


def default_batch_sizes(task: Task) -> tuple[int, int]:
    """The default (small_batch, big_batch) for a task: a quarter and four times its batch size.

    The big batch is capped at the training set; the small one stays below the big one. A big
    batch well above the task's batch narrows the interval when the noise scale is large: the
    |G|^2 estimate is the noisy one, and it improves with B_big.

    Example:
        >>> from batchfit.task import load_example
        >>> default_batch_sizes(load_example("cnn"))
        (16, 256)
    """
    size = len(task.train_data)
    big = min(4 * task.batch_size, size)
    small = max(1, min(task.batch_size // 4, big // 2))
    return small, big


def whole_passes(dataset_size: int, big_batch: int, batches: int) -> int:
    """Passes over the whole training set that cost no more than `batches` big batches of
    `big_batch` samples, at most MAX_WHOLE_PASSES; 0 when not even one does.

    A pass over the whole set makes its big batch the set itself: with the finite-population
    correction its |G|^2 is then exact (the full-data gradient, no sampling noise), which is
    the noisy half of the two-batch estimate (McCandlish et al. 2018, Appendix A), and every
    micro-batch of the pass is one small batch set against it.

    Example:
        >>> whole_passes(2048, 256, 50), whole_passes(1438, 128, 12), whole_passes(4000, 128, 30)
        (6, 1, 0)
    """
    return min(MAX_WHOLE_PASSES, batches * big_batch // dataset_size)


def measure_noise_scale(
    task: Task,
    *,
    small_batch: int | None = None,
    big_batch: int | None = None,
    batches: int = DEFAULT_BATCHES,
    warmup_steps: int | None = None,
    checkpoint: Mapping[str, Any] | str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    finite_population: bool = True,
    memory_budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> NoiseScaleResult:
    """Measure the gradient noise scale of a task, before training it.

    Works on a fresh model from `task.make_model()` (the task and any module it holds stay
    untouched) and restores every random generator afterwards. It first trains that model for
    `warmup_steps` optimizer steps at the task's batch size and rate (the noise scale at
    initialisation can be far from its later value), or starts from `checkpoint`. Then, with
    the model frozen, it draws `batches` big batches without replacement, splits each into
    micro-batches of `small_batch` samples, and takes each micro-batch's gradient as a small
    batch and their weighted mean as the big one (McCandlish et al. 2018, arXiv:1812.06162,
    Appendix A; see the module docstring). Only `small_batch` samples need to fit in memory.
    Warm-up batches follow training's sample order (`batchfit.training.sampling`: shuffled epochs
    seeded `task.seed + epoch`); the measured big batches are
    `torch.randperm(len(task.train_data), generator)[:big_batch]` with a generator seeded
    `task.seed + 1`, so a run is repeatable.

    A small training set is measured in whole passes instead (`whole_passes`: as many as cost no
    more than the `batches` default big batches, at most MAX_WHOLE_PASSES, with the
    finite-population correction and without an explicit `big_batch`): the big batch is then
    the whole set (less fewer than `small_batch` samples left out at random), whose |G|^2 is
    exact, and each micro-batch is one small batch against it; `batches` in the result counts
    those micro-batches and `whole_passes` the passes. The cnn example (2,048 images, default
    B_big 256): 6 passes (12,288 samples) instead of 50 big batches (12,800).

    Args:
        task: the training task.
        small_batch: B_small in samples; default a quarter of `task.batch_size` (at least 2
            on a model with BatchNorm, which cannot train on one sample).
        big_batch: B_big in samples, above small_batch; default four times `task.batch_size`,
            capped at the training set (or the whole set in passes, above).
        batches: big batches to measure; the interval narrows about as 1/sqrt(batches).
        warmup_steps: optimizer steps to train first; default 50, or 0 with a checkpoint.
        checkpoint: a model state_dict, a dict holding one under "model", or a path to a file
            saved with torch.save holding either.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        finite_population: correct for drawing from the finite training set (recommended).
        memory_budget_bytes: when given, check first that a training step at `small_batch`
            fits this budget and runs on this machine
            (`batchfit.memory.runnable.runnable_batch_size`).
        progress: `progress(phase, done, total)` after each step, phase "warmup" or "measure".

    Returns:
        A `NoiseScaleResult` with the measured point (`step`, `samples_seen`) and the running
        estimate for plots.

    Raises:
        ConfigError: a size is not a positive whole number, small_batch >= big_batch, big_batch
            is larger than the training set, or small_batch does not fit the memory budget
            (the message gives the largest batch that fits).
        DoesNotFitError: not even one sample fits the memory budget.
        CheckpointError: the checkpoint cannot be read or does not match the model.
        TaskError: the loss is not finite during warm-up or measurement.

    Example:
        >>> from batchfit.task import load_example
        >>> result = measure_noise_scale(load_example("digits"), batches=5, warmup_steps=2)
        >>> result.batches
        5
    """
    if warmup_steps is None:
        warmup_steps = 0 if checkpoint is not None else DEFAULT_WARMUP_STEPS
    (result,) = measure_noise_scales(
        task,
        warmup_points=[warmup_steps],
        small_batch=small_batch,
        big_batch=big_batch,
        batches=batches,
        checkpoint=checkpoint,
        device=device,
        finite_population=finite_population,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
    )
    return result


def measure_noise_scales(
    task: Task,
    *,
    warmup_points: Sequence[int],
    small_batch: int | None = None,
    big_batch: int | None = None,
    batches: int = DEFAULT_BATCHES,
    checkpoint: Mapping[str, Any] | str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    finite_population: bool = True,
    memory_budget_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[NoiseScaleResult, ...]:
    """Measure the noise scale at several points of one warm-up run, to see how it grows.

    As `measure_noise_scale`, but the fresh model trains on through the warm-up and is
    measured (frozen, with the same `batches` big batches each time) when it has taken each
    number of optimizer steps in `warmup_points`: one warm-up of max(warmup_points) steps
    instead of one per point. The critical batch grows as the loss falls (McCandlish et al.
    2018, section 3.3), so two points a few times apart show its trend
    (`batchfit.noise.trend.fit_noise_trend`).

    Args:
        task: the training task.
        warmup_points: optimizer steps (>= 0) before each measurement, ascending.
        small_batch, big_batch, batches, checkpoint, device, finite_population,
        memory_budget_bytes, progress: as in `measure_noise_scale`.

    Returns:
        One `NoiseScaleResult` per point, in order, each with its `step` and `samples_seen`.

    Raises:
        ConfigError: as `measure_noise_scale`; `warmup_points` empty or not ascending.
        CheckpointError, DoesNotFitError, TaskError: as `measure_noise_scale`.

    Example:
        >>> from batchfit.task import load_example
        >>> early, late = measure_noise_scales(
        ...     load_example("digits"), warmup_points=[2, 8], batches=5
        ... )
        >>> early.step, late.step
        (2, 8)
    """
    import torch

    from batchfit.devices import resolve_device
    from batchfit.snapshot import preserved_rng

    check_task(task, "measure_noise_scale")
    dataset_size = len(task.train_data)
    default_small, default_big = default_batch_sizes(task)
    small = check_whole_number("small_batch", default_small if small_batch is None else small_batch)
    if small_batch is None and small == 1:  # a task batch below 8: BatchNorm needs 2 samples
        from batchfit.plan.norm_layers import smallest_batch

        with preserved_rng(seed=task.seed):
            small = smallest_batch(task.make_model())
    big = check_whole_number("big_batch", default_big if big_batch is None else big_batch)
    batches = check_whole_number("batches", batches)
    points = [check_whole_number("warmup_steps", p, minimum=0) for p in warmup_points]
    if not points or points != sorted(set(points)):
        raise ConfigError(
            f"warmup_points ({list(warmup_points)}) must be one or more distinct step counts in "
            "ascending order, such as [50, 200]."
        )
    if small >= big:
        raise ConfigError(
            f"small_batch ({small}) must be below big_batch ({big}); the noise scale comes from "
            "the difference between the two gradient norms. Raise big_batch or lower small_batch."
        )
    if big > dataset_size:
        raise ConfigError(
            f"big_batch ({big}) is larger than the training set ({dataset_size} samples); "
            f"batches are drawn without replacement, so lower big_batch to at most {dataset_size}."
        )
    passes = 0
    if big_batch is None and finite_population and dataset_size // small >= MIN_PASS_MICRO_BATCHES:
        passes = whole_passes(dataset_size, big, batches)
    if passes:
        # (nearly) whole passes over the set: each micro-batch is a small batch against the
        # pass's (nearly) exact |G|^2; the pass leaves out the remainder, fewer than `small`
        # samples drawn at random, so that every micro-batch has `small` samples
        big, batches = small * (dataset_size // small), passes
    sizes = [small] * (big // small) + ([big % small] if big % small else [])
    target = resolve_device(device)
    if memory_budget_bytes is not None:
        _check_fits(task, small, target, memory_budget_bytes)
    results = []
    with preserved_rng(target, seed=task.seed):
        model = task.make_model().to(target)
        if checkpoint is not None:
            _load_checkpoint(model, checkpoint)
        model.train()
        _check_batchnorm_sizes(model, sizes, big)
        warm_up = _WarmUp(task, model, target, progress, total=points[-1])
        params = [param for param in model.parameters() if param.requires_grad]
        harmonic = len(sizes) / sum(1.0 / size for size in sizes)
        for point in points:
            warm_up.advance(point)
            tracker = NoiseScaleTracker(
                dataset_size=dataset_size if finite_population else None, window=None
            )
            # batches are drawn from their own generator, seeded task.seed + 1, at every point
            generator = torch.Generator().manual_seed(task.seed + 1)
            for index in range(batches):
                order = torch.randperm(dataset_size, generator=generator)[:big].tolist()
                small_sqs, big_sq = _two_norms(task, model, params, order, sizes, target)
                if passes:  # one pair per micro-batch, each against the pass's |G|^2
                    for small_sq in small_sqs:
                        tracker.update(small_sq, big_sq, small_batch=small, big_batch=big)
                else:
                    mean_small_sq = sum(small_sqs) / len(small_sqs)
                    tracker.update(mean_small_sq, big_sq, small_batch=harmonic, big_batch=big)
                report(progress, "measure", index + 1, batches)
            results.append(
                replace(
                    tracker.estimate(running=True),
                    step=point,
                    samples_seen=point * task.batch_size,
                    from_checkpoint=checkpoint is not None,
                    whole_passes=passes,
                    micro_batch=small,
                )
            )
    return tuple(results)


class _WarmUp:
    """Training steps at the task's batch and rate, in stretches, in the training loop's sample
    order (`batchfit.training.sampling.global_batch_indices`)."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        device: torch.device,
        progress: ProgressFn | None,
        *,
        total: int,
    ) -> None:

        self.task, self.model, self.device, self.progress = task, model, device, progress
        self.total = total
        self.step = 0
        self.optimizer = task.make_optimizer(model.parameters()) if total else None

    def advance(self, to_step: int) -> None:
        import torch

        from batchfit.task import move_to
        from batchfit.training.sampling import global_batch_indices

        task = self.task
        while self.step < to_step:
            assert self.optimizer is not None
            # the training loop's own sample order (shuffled epochs seeded task.seed + epoch)
            indices = global_batch_indices(
                self.step,
                dataset_size=len(task.train_data),
                global_batch=task.batch_size,
                seed=task.seed,
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss = scalar_loss(task.loss, self.model, move_to(task.batch(indices), self.device))
            if not torch.isfinite(loss.detach()).all():
                value = float(loss.detach())
                if self.step == 0:  # before any update: the rate cannot be the cause
                    raise TaskError(
                        f"The loss is not finite ({value:g}) on the untrained model, before any "
                        "update: the task's loss or data gives it, not the learning rate; check "
                        "them (a log or division by zero, NaN or inf in the inputs)."
                    )
                raise TaskError(
                    f"The loss is not finite ({value:g}) at warm-up step {self.step}; "
                    f"lower the task's learning rate ({task.lr:g}) or use warmup_steps=0."
                )
            loss.backward()
            self.optimizer.step()
            self.step += 1
            report(self.progress, "warmup", self.step, self.total)


def _two_norms(
    task: Task,
    model: nn.Module,
    params: list[torch.nn.Parameter],
    order: list[int],
    sizes: list[int],
    device: torch.device,
) -> tuple[list[float], float]:
    """Squared norms of the micro-batch gradients, and the squared norm of their weighted mean."""
    import torch

    from batchfit.task import move_to

    total = sum(sizes)
    summed: list[torch.Tensor] | None = None
    small_sq = []
    start = 0
    for size in sizes:
        batch = move_to(task.batch(order[start : start + size]), device)
        start += size
        loss = scalar_loss(task.loss, model, batch)
        if not torch.isfinite(loss.detach()).all():
            raise TaskError(
                f"The loss is not finite ({float(loss):g}) while measuring the noise scale; "
                "check the task's loss, or start from a healthier checkpoint."
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        small_sq.append(sum(float(g.double().square().sum()) for g in grads))
        weight = size / total
        if summed is None:
            summed = [g * weight for g in grads]
        else:
            for accumulator, grad in zip(summed, grads):
                accumulator.add_(grad, alpha=weight)
    assert summed is not None
    big_sq = sum(float(g.double().square().sum()) for g in summed)
    return small_sq, big_sq


def _check_batchnorm_sizes(model: nn.Module, sizes: list[int], big_batch: int) -> None:
    """Refuse micro-batches of one sample on a model with BatchNorm (it cannot train on them)."""
    from batchfit.plan.norm_layers import smallest_batch

    least = smallest_batch(model)
    if min(sizes) >= least:
        return
    what = (
        f"small_batch {sizes[0]}"
        if sizes[0] < least
        else f"big_batch {big_batch}, which leaves a last micro-batch of {sizes[-1]}"
    )
    raise ConfigError(
        f"The model has BatchNorm, which cannot train on a micro-batch of one sample ({what}); "
        f"use a small batch of at least {least} that divides the big batch (--small-batch, "
        "--big-batch)."
    )


def _load_checkpoint(model: nn.Module, checkpoint: Any) -> None:
    import torch

    source = checkpoint
    if not isinstance(checkpoint, Mapping):
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch warns about the pickle it then refuses
                warnings.simplefilter("ignore")
                checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure to read the file is the file's
            # (torch's unpickler raises IndexError, KeyError, ... on arbitrary bytes)
            # torch's message for a pickle it refuses runs to a page; its first line says why.
            lines = str(error).strip().splitlines()
            why = " ".join(lines[0].split())[:200] if lines else "an empty or truncated file"
            if isinstance(error, pickle.UnpicklingError):
                why = "not a torch.save file, or one holding objects weights_only=True refuses"
            raise CheckpointError(
                f"Cannot read the checkpoint {str(source)!r} ({type(error).__name__}: {why}). "
                "Give a file saved with torch.save(model.state_dict(), path)."
            ) from None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"The checkpoint holds {type(checkpoint).__name__}, not a state_dict; save "
            "model.state_dict() (or a dict with it under 'model')."
        )
    try:
        model.load_state_dict(checkpoint)
    except RuntimeError as error:
        # torch's first line only names the module ("Error(s) in loading state_dict for
        # Linear:"); the lines after it say which keys are missing, unexpected or misshapen.
        lines = [" ".join(line.split()) for line in str(error).strip().splitlines()]
        details = "; ".join(line for line in lines[1:] if line) or lines[0]
        if len(details) > 300:
            details = details[:297] + "..."
        raise CheckpointError(
            f"The checkpoint does not match the task's model ({details}); give a checkpoint "
            "saved from this task's model."
        ) from None


def _check_fits(task: Task, small_batch: int, device: torch.device, budget_bytes: int) -> None:
    """Raise when a training step at `small_batch` does not fit the memory budget here.

    `batchfit.memory.runnable.runnable_batch_size` (margin 0, searched up to `small_batch`):
    the largest batch that fits the budget and that this machine can run, since the
    measurement runs real steps at `small_batch` on this machine whatever the budget stands for.
    """
    from batchfit.memory.runnable import runnable_batch_size
    from batchfit.units import format_bytes

    # raises DoesNotFitError itself when not even one sample fits
    limit = runnable_batch_size(
        task, device=device, memory_budget=budget_bytes, margin=0.0, max_batch_size=small_batch
    )
    if limit < small_batch:
        raise ConfigError(
            f"small_batch ({small_batch}) does not fit the memory budget of "
            f"{format_bytes(budget_bytes)} on this machine: the largest batch that fits is "
            f"{limit}. Use a small batch of {limit} or less; the big batch is accumulated from "
            "small ones and need not fit."
        )
