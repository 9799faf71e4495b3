"""Squared gradient norms of each micro-batch (and each DDP rank) during training, nearly free.

A `GradientNormWatch` registers a hook on every trainable parameter. During each backward the
hook sees the gradient that backward contributes, before it is added into `.grad` (and, under
DistributedDataParallel, before the all-reduce: each rank's *local* gradient), and keeps its
norm on the device, without a copy and without a host sync. Norms are grouped by backward pass
(autograd's graph task): one group is one micro-batch. At the
end of an optimizer step, `.grad` holds the accumulated (and all-reduced) gradient: the big
batch. Together they feed a `NoiseScaleTracker` (see `batchfit.noise.estimator`).

Calls a training loop makes, per optimizer step:

    watch = GradientNormWatch(model, tracker)   # once; watch.remove() when done
    optimizer.zero_grad()
    for micro_batch in micro_batches:
        (loss_fn(model, micro_batch) * weight).backward()   # weight = n / total, as usual
        watch.micro_batch(n)              # n: samples in this micro-batch
    watch.step()                          # before clipping, unscaling or optimizer.step()
    optimizer.step()

Under DDP each rank makes the same calls; `step()` all-reduces four numbers (one tiny
collective per step), so every rank's tracker holds the same estimate.

One micro-batch on one rank (`single_micro_batch="consecutive_steps"`, the default): a step then
has no smaller batch inside it, so the watch pairs each step's gradient g_t (B_t samples) with
the previous step's g_{t-1}, as AdaptDL does for a single replica (Qiao et al. 2021, "Pollux",
OSDI, section 3.1): the two are the small batches, their sample-weighted mean the big one. It
keeps one copy of the gradient (memory: the size of the trainable parameters) and costs one dot
product per step; no extra backward. Consecutive batches of a shuffled epoch are disjoint, so the
finite-population correction holds. Its bias, stated: the parameters move between the two
steps, so with B_t = B_{t-1} = B the per-step estimates have expectations

    |G|^2:     G_t . G_{t-1} = |G|^2 - lr (G^T H G + tr(H Sigma) / B)   (plain SGD, Hessian H)
    tr(Sigma): tr(Sigma) + (B / 2) |G_t - G_{t-1}|^2

both of which push the noise scale *up*; the bias is small while lr times the curvature is
small, and largest late in training with a large rate (momentum adds to the step). Where that
matters, use two or more micro-batches per step (gradient accumulation), which is unbiased.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from batchfit.errors import ConfigError
from batchfit.noise.estimator import NoiseScaleTracker

if TYPE_CHECKING:
    import torch
    from torch import nn


logger = logging.getLogger(__name__)

__all__ = ["SINGLE_MICRO_BATCH_MODES", "GradientNormWatch"]

SINGLE_MICRO_BATCH_MODES = ("consecutive_steps", "skip")


class GradientNormWatch:
    """Measures micro-batch and accumulated gradient norms for a `NoiseScaleTracker`.

    Made once per model: `GradientNormWatch(model, tracker)`. Only reads gradients; never
    changes them.

    Example:
        >>> import torch
        >>> from batchfit.noise.estimator import NoiseScaleTracker
        >>> model = torch.nn.Linear(3, 1)
        >>> tracker = NoiseScaleTracker(window=None)
        >>> watch = GradientNormWatch(model, tracker)
        >>> data = torch.randn(8, 3)
        >>> for part in data.split(4):
        ...     (model(part).pow(2).mean() * 0.5).backward()
        ...     watch.micro_batch(4)
        >>> watch.step()
        >>> tracker.updates
        1
        >>> watch.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        tracker: NoiseScaleTracker,
        *,
        distributed: bool | None = None,
        process_group: Any = None,
        single_micro_batch: Literal["consecutive_steps", "skip"] = "consecutive_steps",
    ) -> None:
        import torch

        if single_micro_batch not in SINGLE_MICRO_BATCH_MODES:
            raise ConfigError(
                f"single_micro_batch must be one of {SINGLE_MICRO_BATCH_MODES}, got "
                f"{single_micro_batch!r}."
            )
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; the arguments are "
                "GradientNormWatch(model, tracker), the model whose gradients are measured."
            )
        if not isinstance(tracker, NoiseScaleTracker):
            raise ConfigError(
                f"tracker must be a NoiseScaleTracker, got {type(tracker).__name__}; build one "
                "with NoiseScaleTracker(dataset_size=len(train_data))."
            )
        self.single_micro_batch = single_micro_batch
        # the previous step's unscaled, unclipped gradient and its samples (consecutive steps)
        self._previous: tuple[list[torch.Tensor], torch.Tensor, float, int | None] | None = None
        self.tracker = tracker
        self.params = [param for param in model.parameters() if param.requires_grad]
        if not self.params:
            raise ConfigError("The model has no trainable parameters, so it has no gradient.")
        if distributed is None:
            distributed = (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size(process_group) > 1
            )
        self.distributed = bool(distributed)
        self.process_group = process_group
        # one squared norm per backward pass since the last micro_batch()/step(), and the
        # indices of the parameters it reached
        self._pending: list[torch.Tensor] = []
        self._pending_params: list[set[int]] = []
        self._group: list[torch.Tensor] = []  # per-parameter norms of the running backward
        self._group_params: set[int] = set()
        self._group_id: object = None  # which backward pass `_group` belongs to
        self._micro: list[tuple[torch.Tensor, float, float | None]] = []
        self._warned_single = False
        # One hook per parameter: it takes the norm at once and keeps no reference to the
        # gradient, so autograd still frees (or steals) it as usual: no extra memory. (A
        # multi-grad hook would hold every gradient until the backward ends.)
        self._handles = [
            param.register_hook(functools.partial(self._hook, index))
            for index, param in enumerate(self.params)
        ]

    def _hook(self, index: int, grad: torch.Tensor) -> None:

        backward = _backward_id(self._group_id, len(self._group), len(self.params))
        if backward != self._group_id:
            self._close_group()
            self._group_id = backward
        self._group_params.add(index)
        self._group.append(gradient_norm(grad))

    def _close_group(self) -> None:
        import torch

        if self._group:
            value = torch.stack(self._group).double().square().sum()
            if self._pending and self._pending_params[-1].isdisjoint(self._group_params):
                # A backward nested in the last one: reentrant checkpointing runs each segment's
                # backward as its own, on parameters the outer one does not reach. Same
                # micro-batch; a backward that reaches a parameter again is another one.
                self._pending[-1] = self._pending[-1] + value
                self._pending_params[-1] |= self._group_params
            else:
                self._pending.append(value)
                self._pending_params.append(self._group_params)
        self._group, self._group_params = [], set()
        self._group_id = None

    def micro_batch(self, samples: float, *, loss_scale: float | None = None) -> None:
        """Record the gradient of the backward that just ran as one small batch.

        Args:
            samples: samples (the unit the loss averages over) in the micro-batch.
            loss_scale: the factor the micro-batch's mean loss was multiplied by before backward;
                default `samples / (sum of samples this step)`, as `accumulate_gradients` and
                `micro_batch_weights` use. Leave a GradScaler's scale out: pass it to `step()`.

        Raises:
            ConfigError: samples or loss_scale is not positive, or no backward ran since the
                last call.
        """
        if isinstance(samples, bool) or not isinstance(samples, (int, float)) or samples <= 0:
            raise ConfigError(f"samples must be a positive count, got {samples!r}.")
        if loss_scale is not None and not loss_scale > 0:
            raise ConfigError(f"loss_scale must be positive, got {loss_scale!r}.")
        self._close_group()
        if not self._pending:
            raise ConfigError(
                "micro_batch() was called but no backward ran since the last call; call it "
                "once after each micro-batch's backward()."
            )
        if len(self._pending) > 1:
            raise ConfigError(
                f"{len(self._pending)} backward passes ran since the last micro_batch() call; "
                "the norm of a sum of gradients is not the sum of their norms, so add the "
                "micro-batch's losses and call backward() once per micro-batch."
            )
        self._pending_params = []
        self._micro.append((self._pending.pop(), float(samples), loss_scale))

    def discard_backward(self) -> None:
        """Forget the backward passes since the last `micro_batch()` call: a backward that is no
        micro-batch (one that only sums gradients measured part by part)."""
        self._close_group()
        self._pending, self._pending_params = [], []

    def reset(self) -> None:
        """Forget what was recorded since the last `step()` (e.g. a step redone after OOM)."""
        self._pending, self._pending_params = [], []
        self._group, self._group_params = [], set()
        self._group_id = None
        self._micro = []

    def step(
        self,
        micro_batch_samples: Sequence[float] | None = None,
        *,
        loss_scales: Sequence[float] | None = None,
        big_sq_norm: float | None = None,
        grad_scale: float = 1.0,
        step: int | None = None,
    ) -> None:
        """Close the optimizer step: the accumulated gradient is the big batch; update the tracker.

        Two ways to name the micro-batches: call `micro_batch(n)` after each backward, then
        `step()`; or run them all (e.g. with `accumulate_gradients`) and pass their sizes here,
        `step(micro_batch_samples)`: each backward since the last step is one micro-batch, and
        when more ran (an attempt redone after out-of-memory), the last ones count.

        Call after the last backward and before `optimizer.step()`, and before gradient clipping
        unless `big_sq_norm` is given. A step with a single micro-batch on a single rank is
        paired with the previous step (see the module docstring), or skipped with
        `single_micro_batch="skip"`; a step whose gradients are not finite (a mixed-precision
        overflow) is skipped.

        Args:
            micro_batch_samples: samples of each micro-batch of this step on this rank, in
                order; None when `micro_batch()` was called for each.
            loss_scales: with `micro_batch_samples`, the factor each mean loss was multiplied
                by; default `samples / sum(samples)` (see `micro_batch`).
            big_sq_norm: the squared norm of the accumulated (all-reduced, unscaled) gradient
                when the caller has it, e.g. `grad_norm ** 2` from `clip_grad_norm_` (which
                returns the norm before clipping); default: read from `.grad`.
            grad_scale: the loss scale the gradients carry (GradScaler.get_scale()); 1.0
                without one.
            step: the optimizer step, recorded with the estimate; default the tracker's count.

        Raises:
            ConfigError: the micro-batches do not match the backward passes that ran.
        """
        import torch

        self._close_group()
        if micro_batch_samples is not None:
            self._record_from_sizes(list(micro_batch_samples), loss_scales)
        if self._pending:
            raise ConfigError(
                "A backward ran after the last micro_batch() call; call micro_batch(samples) "
                "after each micro-batch's backward, or pass the sizes to step()."
            )
        micro, self._micro = self._micro, []
        if not micro:
            raise ConfigError("step() was called with no micro_batch() since the last step.")
        local_samples = sum(samples for _, samples, _ in micro)
        # The hook saw each micro-batch's gradient times its loss weight: undo the weight.
        inverse_weights_sq = [
            (local_samples / samples if loss_scale is None else 1.0 / loss_scale) ** 2
            for _, samples, loss_scale in micro
        ]
        squared = torch.stack([value for value, _, _ in micro])
        small_sum = (squared * squared.new_tensor(inverse_weights_sq)).sum()
        if big_sq_norm is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            big_sq = _sum_of_squares(grads).double()
        else:
            big_sq = small_sum.new_tensor(float(big_sq_norm) * grad_scale**2)
        counts = [sum(1.0 / samples for _, samples, _ in micro), float(len(micro)), local_samples]
        if self.distributed:
            numbers = torch.cat([small_sum.reshape(1), small_sum.new_tensor(counts)])
            torch.distributed.all_reduce(numbers, group=self.process_group)
            small_total, inverse_total, count, samples_total = numbers.tolist()
            big_sq_value = float(big_sq)
        else:
            small_total, big_sq_value = torch.stack([small_sum, big_sq]).tolist()  # one sync
            inverse_total, count, samples_total = counts
        if count < 2:
            if self.single_micro_batch == "consecutive_steps" and not self.distributed:
                self._consecutive_steps(small_total / grad_scale**2, samples_total, step)
            elif not self._warned_single:
                logger.info(
                    "noise scale: one micro-batch on one rank per step measures nothing with "
                    "single_micro_batch='skip'; use gradient accumulation or DDP"
                )
                self._warned_single = True
            return
        # the micro-batch gradients carry the GradScaler's scale just as `.grad` does
        small_sq = small_total / count / grad_scale**2
        big_sq_value /= grad_scale**2
        if not (math.isfinite(small_sq) and math.isfinite(big_sq_value)):
            logger.info("noise scale: skipped a step whose gradients are not finite")
            return
        small_batch = count / inverse_total  # harmonic mean of the micro-batch sizes
        self.tracker.update(
            small_sq, big_sq_value, small_batch=small_batch, big_batch=samples_total, step=step
        )

    def _consecutive_steps(self, sq_norm: float, samples: float, step: int | None) -> None:
        """Pair this step's gradient with the previous step's (see the module docstring)."""
        import torch

        previous, self._previous = self._previous, None
        if not math.isfinite(sq_norm):
            logger.info("noise scale: skipped a step whose gradients are not finite")
            return
        grads = [p.grad for p in self.params]
        if any(grad is None or grad.is_sparse for grad in grads):
            if not self._warned_single:
                logger.info(
                    "noise scale: a parameter has no or a sparse gradient, so consecutive steps "
                    "cannot be compared; use gradient accumulation"
                )
                self._warned_single = True
            return
        # `.grad` may be clipped and carry a loss scale: rescale it to the norm the hook saw
        held_sq = _sum_of_squares(grads).double()
        factor = (held_sq.new_tensor(sq_norm) / held_sq.clamp_min(1e-300)).sqrt()
        current = [grad.detach().float() * factor.float() for grad in grads]
        expected_step = None if previous is None or previous[3] is None else previous[3] + 1
        self._previous = (current, held_sq.new_tensor(sq_norm), samples, step)
        if previous is None or (step is not None and expected_step not in (None, step)):
            return  # the first step, or a step was skipped: nothing adjacent to pair with
        before, before_sq, before_samples, _ = previous
        dot = torch.stack([(a * b).sum(dtype=torch.float64) for a, b in zip(current, before)]).sum()
        dot_value, before_value = torch.stack([dot, before_sq]).tolist()  # one sync
        total = samples + before_samples
        big_sq = (
            samples**2 * sq_norm
            + 2 * samples * before_samples * dot_value
            + before_samples**2 * before_value
        ) / total**2
        small_sq = (sq_norm + before_value) / 2
        small_batch = 2 / (1 / samples + 1 / before_samples)  # harmonic mean
        if self.tracker.dataset_size is not None and total > self.tracker.dataset_size:
            return  # two steps hold more than the training set: not a draw without replacement
        self.tracker.update(
            small_sq,
            max(big_sq, 0.0),
            small_batch=small_batch,
            big_batch=total,
            step=step,
            samples=int(samples),
        )

    def _record_from_sizes(self, sizes: list[float], loss_scales: Sequence[float] | None) -> None:
        if self._micro:
            raise ConfigError(
                "Give the micro-batch sizes either with micro_batch() calls or to step(), not both."
            )
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0:
                raise ConfigError(f"micro-batch sizes must be positive counts, got {sizes}.")
        scales = [None] * len(sizes) if loss_scales is None else list(loss_scales)
        if len(scales) != len(sizes):
            raise ConfigError(
                f"loss_scales has {len(scales)} entries for {len(sizes)} micro-batches; give "
                "one per micro-batch."
            )
        if len(self._pending) < len(sizes):
            raise ConfigError(
                f"{len(sizes)} micro-batch sizes were given but {len(self._pending)} backward "
                "passes ran since the last step; give one size per backward."
            )
        pending, self._pending, self._pending_params = self._pending[-len(sizes) :], [], []
        self._micro = [(value, float(n), scale) for value, n, scale in zip(pending, sizes, scales)]

    def remove(self) -> None:
        """Remove the hooks; the watch measures nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def __enter__(self) -> GradientNormWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a gradient (the values of a sparse one), on its device, without a sync;
    half-precision gradients are accumulated in float32, which keeps them from overflowing."""
    import torch

    values = (grad.coalesce().values() if grad.is_sparse else grad).detach()
    if values.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(values)
    return torch.linalg.vector_norm(values, dtype=torch.float32)


def _backward_id(current: object, seen: int, parameters: int) -> object:
    """Which backward pass is running: autograd's graph-task id (a new one per backward)."""
    import torch

    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    if graph_task_id is not None:
        return graph_task_id()
    # Older torch: each parameter's hook fires once per backward, so a full group means the
    # next hook belongs to a new backward.
    if current is None or seen >= parameters:
        return object()
    return current


def _sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of all `grads` as a float32 tensor on their device (no sync)."""
    import torch

    dense = [(grad.coalesce().values() if grad.is_sparse else grad).detach() for grad in grads]
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None and all(grad.dtype == torch.float32 for grad in dense):
        # the fused kernel clip_grad_norm_ uses: one launch per device instead of one per tensor
        return torch.stack(foreach_norm(dense)).square().sum()
    # float32 accumulation keeps half-precision gradients from overflowing when squared
    norms = [torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in dense]
    return torch.stack(norms).square().sum()
