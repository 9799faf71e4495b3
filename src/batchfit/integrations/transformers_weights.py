"""What the Hugging Face Trainer did to the gradients of an optimizer step: the loss weight of
each micro-batch, the GradScaler's scale (`grad_scale_of`), clipping (`was_clipped`).

`NoiseScaleTrainerCallback`'s watch sees each micro-batch's gradient times the factor its loss
was multiplied by, and must undo that factor. The Trainer weighs micro-batches in one of two ways
(`Trainer.training_step`, `Trainer.compute_loss`):

- the model takes loss keyword arguments (a causal language model): the Trainer counts the
  label tokens of all the step's micro-batches (`num_items_in_batch`, N) and the model divides
  its summed loss by that count, so micro-batch i weighs n_i / N, n_i the label tokens its
  loss sums;
- otherwise each micro-batch's mean loss is divided by the step's micro-batches.

Only the weights relative to each other matter to the noise scale: a factor on all of them
scales `.grad` alike. So the weights given are n_i / (this process's tokens), which also holds
where the Trainer's N is not what the loss sums (GPT-2, without a `loss_type`, is counted
unshifted) and, under several processes (where N counts every process's tokens), as long as
the processes hold as many label tokens each.

Padding labelled -100 makes n_i differ between micro-batches: weighing them equally then read
each micro-batch's gradient wrongly (a GPT-2 step of two micro-batches of 4 samples with 8 and
60 label tokens gave |G|^2 = -0.20 and tr(Sigma) = 18.1 for -4.45 and 56.3).
`MicroBatchWeights` reads each training forward's arguments (a forward pre-hook on the model)
and gives the sizes and weights `GradientNormWatch.step` takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from batchfit.errors import TaskError
from batchfit.task import batch_size_of

__all__ = [
    "IGNORE_INDEX",
    "MicroBatchWeights",
    "grad_scale_of",
    "grad_sq_norm",
    "is_causal_lm",
    "label_items",
    "was_clipped",
]

IGNORE_INDEX = -100
"""The label the Hugging Face losses skip (padding, prompts)."""

CLIPPED_TOLERANCE = 1e-3
"""A gradient norm within this relative distance of max_grad_norm was clipped."""


class MicroBatchWeights:
    """Samples and loss weight of each training forward of `model` since the last `take()`.

    Args:
        model: the model the Trainer trains (its forward is watched; evaluation, which runs
            without gradients, is not counted).
        shifts_labels: whether the loss predicts the next token (a causal language model),
            so that the first label of each row is not counted, as the Trainer counts.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> weights = MicroBatchWeights(model, shifts_labels=False)
        >>> _ = model(torch.ones(3, 2)); _ = model(torch.ones(1, 2))
        >>> weights.take()
        ([3, 1], [0.5, 0.5])
        >>> weights.remove()
    """

    def __init__(self, model: Any, *, shifts_labels: bool) -> None:
        self.shifts_labels = shifts_labels
        self._forwards: list[tuple[int | None, Any]] = []  # (samples, label tokens)
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return  # an evaluation
        try:
            samples: int | None = batch_size_of(list(args) + list(kwargs.values()))
        except TaskError:  # no tensor with a first dimension: the step is not measured
            samples = None
        items = None
        if kwargs.get("num_items_in_batch") is not None:  # the Trainer weighs by tokens
            if kwargs.get("shift_labels") is not None:  # shifted already by the collator
                items = label_items(kwargs["shift_labels"], shifts_labels=False)
            elif kwargs.get("labels") is not None:
                items = label_items(kwargs["labels"], shifts_labels=self.shifts_labels)
        self._forwards.append((samples, items))

    def take(self) -> tuple[list[int | None], list[float]]:
        """Samples and loss weight of each micro-batch since the last call, and start over.

        The weights are each micro-batch's share of this process's label tokens when the
        Trainer weighed them by tokens, else equal; they sum to 1 (see the module docstring).

        Returns:
            (samples per micro-batch, None where unknown; each micro-batch's loss weight, 0
            for one without label tokens); two empty lists when no training forward ran.
        """
        import torch

        forwards, self._forwards = self._forwards, []
        sizes = [samples for samples, _ in forwards]
        if not forwards:
            return [], []
        if any(items is None for _, items in forwards):
            return sizes, [1.0 / len(forwards)] * len(forwards)
        values = [torch.as_tensor(items, dtype=torch.float64).reshape(()) for _, items in forwards]
        items = torch.stack([value.cpu() for value in values]).tolist()
        local = sum(items)
        return sizes, [n / local if local else 0.0 for n in items]

    def remove(self) -> None:
        """Remove the forward hook."""
        self._handle.remove()
        self._forwards = []


def label_items(labels: Any, *, shifts_labels: bool) -> Any:
    """The labels a loss averages over (a 0-dim tensor): not IGNORE_INDEX, and for a loss
    that predicts the next token (`shifts_labels`), not the first of each row.

    Example:
        >>> import torch
        >>> int(label_items(torch.tensor([[5, 6, -100]]), shifts_labels=True))
        1
    """
    return ((labels[..., 1:] if shifts_labels else labels) != IGNORE_INDEX).sum()


def is_causal_lm(model: Any) -> bool:
    """Whether `model` is a causal language model of transformers (its loss shifts labels)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return type(model).__name__ in names


def grad_sq_norm(params: Sequence[Any]) -> float:
    """The squared norm of the parameters' `.grad`."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) ** 2 if grads else 0.0


def was_clipped(params: Sequence[Any], max_grad_norm: float) -> bool:
    """Whether the parameters' `.grad` was clipped to `max_grad_norm` (its norm is that)."""
    if all(p.grad is None for p in params):
        return False
    return grad_sq_norm(params) ** 0.5 >= max_grad_norm * (1 - CLIPPED_TOLERANCE)


def grad_scale_of(optimizer: Any) -> tuple[float, bool]:
    """The GradScaler's scale on this step's gradients (Accelerate's optimizer holds it as
    `.scaler` under fp16), and whether `.grad` has been unscaled already (1.0, False without
    a scaler)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0, False
    inner = getattr(optimizer, "optimizer", optimizer)
    # torch keeps each optimizer's stage (READY, UNSCALED, STEPPED) in the scaler
    stage = getattr(scaler, "_per_optimizer_states", {}).get(id(inner), {}).get("stage")
    return float(scaler.get_scale()), getattr(stage, "name", None) == "UNSCALED"
