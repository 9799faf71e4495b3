"""Which logged series is the training loss, the validation loss, the metric, the rate and the
noise scale, found by name in any of the logs `batchfit.monitor.readers` reads.

Names are matched after lower-casing and turning "/", "-" and "." into "_" (so `train/loss`,
`lr-Adam` and `eval/accuracy` are found); a name given by the user must be logged exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from batchfit.errors import RunLogError

__all__ = [
    "GLOBAL_BATCH_NAMES",
    "GRAD_NORM_NAMES",
    "LR_FACTOR_NAMES",
    "NOISE_NAMES",
    "TRAIN_LOSS_NAMES",
    "VAL_LOSS_NAMES",
    "normal_name",
    "pick_lr",
    "pick_metric",
    "pick_series",
    "rule_of_optimizer",
]

# Candidate names, normalised, most specific first.
TRAIN_LOSS_NAMES = (
    "loss", "train_loss_step", "train_loss", "training_loss", "loss_train", "train_loss_epoch",
    "train_epoch_loss", "epoch_loss",
)  # fmt: skip
VAL_LOSS_NAMES = (
    "val_loss", "eval_loss", "valid_loss", "validation_loss", "val_loss_epoch", "loss_val",
    "loss_valid", "loss_validation", "validation_epoch_loss", "val_epoch_loss",
)  # fmt: skip
# batchfit's TensorBoard tag is `train/lr`, the Trainer's `train/learning_rate`; batchfit's
# Lightning callback logs `lr_applied`, the rate with its warm-up and batch schedule's factors,
# which Lightning's LearningRateMonitor (`lr-Adam`) logs without
LR_NAMES = ("lr_applied", "lr", "learning_rate", "train_lr", "train_learning_rate", "lr_abs")
# batchfit's TensorBoard tag `noise/noise_scale`; the Hugging Face Trainer's TensorBoard
# callback writes the noise scale of `NoiseScaleTrainerCallback` as `train/noise_scale`
NOISE_NAMES = ("noise_scale", "noise_noise_scale", "train_noise_scale")
# batchfit's metrics lines and the Hugging Face Trainer's log_history log `grad_norm`; the
# Trainer's TensorBoard callback writes `train/grad_norm`
GRAD_NORM_NAMES = ("grad_norm", "train_grad_norm", "gradient_norm")
# batchfit's metrics lines and its Lightning callback log `global_batch`; its TensorBoard tag is
# `train/global_batch`
GLOBAL_BATCH_NAMES = ("global_batch", "train_global_batch")
# a batch schedule's rate factor: batchfit's metrics lines `lr_factor`, its TensorBoard tag
# `train/lr_factor`
LR_FACTOR_NAMES = ("lr_factor", "train_lr_factor")
VAL_PREFIXES = ("val_", "eval_", "valid_", "validation_")
# `Accuracy/val`, `acc_valid`: the validation split named after the metric (SummaryWriter loops)
VAL_SUFFIXES = ("_val", "_eval", "_valid", "_validation")
PREFERRED_METRICS = ("accuracy", "acc", "iou", "miou", "dice", "f1", "auc", "top1", "map")
NOT_METRICS = ("loss", "runtime", "per_second", "epoch", "step", "samples", "flos")


def normal_name(name: str) -> str:
    """`Train/Loss` -> `train_loss`: lower case, "/", "-", "." and spaces as "_"."""
    return re.sub(r"[/\-.\s]+", "_", name.strip().lower())


def pick_series(
    available: Iterable[str], given: str | None, candidates: Iterable[str], flag: str, file: Path
) -> str | None:
    """The series `given` by the user (RunLogError naming `--flag` when it is not logged in
    `file`), else the first of `candidates` logged (compared by `normal_name`), else None."""
    available = list(available)
    if given is not None:
        if given in available:
            return given
        raise RunLogError(
            f"--{flag} {given!r} is not logged in {str(file)!r}; it has: "
            f"{', '.join(sorted(available)) or 'nothing'}."
        )
    by_normal = {normal_name(name): name for name in available}
    for candidate in candidates:
        if candidate in by_normal:
            return by_normal[candidate]
    return None


def pick_metric(available: Iterable[str], given: str | None, file: Path) -> str | None:
    """The validation metric: `given`, else a validation-named series that is not a loss,
    accuracy, IoU, F1, ... first (`PREFERRED_METRICS`); None when there is none."""
    available = list(available)
    if given is not None:
        return pick_series(available, given, (), "metric", file)
    metrics = []
    for name in available:
        normal = normal_name(name)
        if any(word in normal for word in NOT_METRICS):
            continue
        prefix = next((p for p in VAL_PREFIXES if normal.startswith(p)), None)
        suffix = next((s for s in VAL_SUFFIXES if normal.endswith(s)), None)
        if prefix is not None:
            metrics.append((normal[len(prefix) :], name))
        elif suffix is not None:
            metrics.append((normal[: -len(suffix)], name))
    for preferred in PREFERRED_METRICS:
        for rest, name in metrics:
            if rest == preferred or rest.startswith(preferred + "_"):
                return name
    return sorted(metrics)[0][1] if metrics else None


def pick_lr(available: Iterable[str]) -> str | None:
    """The learning-rate series, by name (`LR_NAMES`) or Lightning's `lr-<Optimizer>` tag."""
    available = list(available)
    found = pick_series(available, None, LR_NAMES, "lr", Path())
    if found is None:  # Lightning's LearningRateMonitor: lr-Adam, lr-SGD/pg1, ...
        found = next((n for n in sorted(available) if normal_name(n).startswith("lr_")), None)
    return found


LINEAR_OPTIMIZERS = ("sgd", "lars")
SQRT_OPTIMIZERS = ("adam", "lamb", "lion", "adafactor", "adagrad", "adadelta", "rmsprop")


def rule_of_optimizer(available: Iterable[str]) -> str | None:
    """The scaling rule of the optimizer family that Lightning's LearningRateMonitor names in
    its tags (`lr-SGD`, `lr-AdamW/pg1`): linear for SGD and LARS, sqrt for the Adam family
    (`batchfit.lr.scaling.default_rule`); None when no tag names one, or they disagree."""
    rules = set()
    for name in available:
        normal = normal_name(name)
        if not normal.startswith("lr_"):
            continue
        optimizer = normal[3:].split("_")[0]
        if optimizer.startswith(LINEAR_OPTIMIZERS):
            rules.add("linear")
        elif any(family in optimizer for family in SQRT_OPTIMIZERS):
            rules.add("sqrt")
    return rules.pop() if len(rules) == 1 else None
