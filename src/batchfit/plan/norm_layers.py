"""Batch-size-sensitive layers: find BatchNorm, advise on it, convert it.

BatchNorm normalises with the mean and variance of the samples one device sees in one
micro-batch; gradient accumulation does not enlarge that. Below about 32 samples the statistics
get noisy and training unstable (Ioffe & Szegedy 2015; Wu & He 2018, "Group Normalization",
whose Figure 1 shows BatchNorm's error rising below 32 images per device while GroupNorm's stays
flat). The usual remedies: SyncBatchNorm under DDP (statistics over every device's samples), or
GroupNorm, which does not depend on the batch at all.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from batchfit.errors import ConfigError
from batchfit.units import format_count

BATCHNORM_MIN_SAMPLES = 32
"""Samples per BatchNorm call below which its statistics are too noisy (Wu & He 2018, Fig. 1)."""

GROUPNORM_GROUPS = 32
"""Wu & He's default number of groups; fewer when the channel count is not divisible."""

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class NormLayer:
    """One batch-size-sensitive layer: its dotted name, class name and channel count."""

    name: str
    kind: str
    num_features: int


@dataclass(frozen=True)
class NormAdvice:
    """What to do about BatchNorm at a given micro-batch and device count.

    Attributes:
        layers: the BatchNorm layers found.
        samples_per_call: samples each BatchNorm call sees (the micro-batch on one device).
        action: "keep", "syncbatchnorm" or "groupnorm".
        reason: the advice in words, with its numbers.
    """

    layers: tuple[NormLayer, ...]
    samples_per_call: int
    action: Literal["keep", "syncbatchnorm", "groupnorm"]
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Conversion:
    """The result of `convert_batchnorm`: the converted copy and a list of what changed."""

    model: nn.Module
    changes: tuple[str, ...]


def find_batchnorm_layers(model: nn.Module) -> list[NormLayer]:
    """Every BatchNorm (1d/2d/3d/Sync) layer in `model`, in module order.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> [layer.name for layer in find_batchnorm_layers(model)]
        ['1']
    """
    return [
        NormLayer(name, type(module).__name__, module.num_features)
        for name, module in model.named_modules()
        if isinstance(module, _BATCHNORM_TYPES)
    ]


def smallest_batch(model: nn.Module) -> int:
    """The smallest micro-batch worth trying on `model`: 2 when it has BatchNorm, else 1.

    BatchNorm in training mode needs more than one value per channel; at batch 1 a BatchNorm1d
    (or a BatchNorm2d after global pooling) raises "Expected more than 1 value per channel when
    training", so probes and timings of such a model start at 2.

    Example:
        >>> smallest_batch(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
        2
        >>> smallest_batch(nn.Linear(4, 4))
        1
    """
    return 2 if find_batchnorm_layers(model) else 1


def is_single_sample_batchnorm_error(error: BaseException) -> bool:
    """Whether `error` is BatchNorm refusing a batch of one value per channel (torch's
    `ValueError: Expected more than 1 value per channel when training`)."""
    return isinstance(error, ValueError) and "more than 1 value per channel" in str(error)


def batchnorm_advice(
    model: nn.Module,
    micro_batch: int,
    *,
    world_size: int = 1,
    min_samples: int = BATCHNORM_MIN_SAMPLES,
) -> NormAdvice | None:
    """Advise on BatchNorm when each call sees fewer than `min_samples` samples.

    Args:
        model: the model to inspect.
        micro_batch: samples per device per forward pass.
        world_size: number of data-parallel devices.
        min_samples: the smallest per-call batch BatchNorm handles well.

    Returns:
        None when the model has no BatchNorm; otherwise the advice: keep it (enough samples),
        SyncBatchNorm (several devices whose samples together reach `min_samples`), or
        GroupNorm (not even that).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> batchnorm_advice(model, 8, world_size=4).action
        'syncbatchnorm'
    """
    if micro_batch < 1 or world_size < 1:
        raise ConfigError(
            f"micro_batch ({micro_batch}) and world_size ({world_size}) must be at least 1."
        )
    layers = tuple(find_batchnorm_layers(model))
    if not layers:
        return None
    count = format_count(len(layers), "BatchNorm layer")
    if micro_batch >= min_samples:
        return NormAdvice(
            layers,
            micro_batch,
            "keep",
            f"keep BatchNorm: {count} see {micro_batch} samples per call, at least {min_samples}.",
        )
    if world_size > 1 and micro_batch * world_size >= min_samples:
        return NormAdvice(
            layers,
            micro_batch,
            "syncbatchnorm",
            f"use SyncBatchNorm: {count} see only {micro_batch} samples per device per call "
            f"(below {min_samples}); synchronised over {world_size} devices they see "
            f"{micro_batch * world_size}.",
        )
    return NormAdvice(
        layers,
        micro_batch,
        "groupnorm",
        f"use GroupNorm: {count} see only {micro_batch} samples per call (below {min_samples}), "
        "and accumulation does not enlarge that; GroupNorm's statistics do not depend on the "
        "batch (Wu & He 2018).",
    )


def convert_batchnorm(
    model: nn.Module,
    *,
    to: Literal["groupnorm", "syncbatchnorm"],
    groups: int = GROUPNORM_GROUPS,
) -> Conversion:
    """A copy of `model` with its BatchNorm layers replaced; the given model is not changed.

    GroupNorm: the per-channel affine weight and bias are carried over (they mean the same in
    both layers); running mean/variance are dropped (GroupNorm keeps none). The group count is
    the largest divisor of the channel count not above `groups`, except for BatchNorm1d, which
    gets one group (LayerNorm over its features): it often normalises (N, C) activations, where
    a group of C / `groups` numbers has too few to normalise (a group of one channel outputs
    its bias alone, whatever the input). SyncBatchNorm: everything is
    carried over (torch's `SyncBatchNorm.convert_sync_batchnorm`); it needs a process group
    to run.

    Returns:
        The converted copy and one line per changed layer.

    Raises:
        ConfigError: unknown target, or `groups` below 1.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> conversion = convert_batchnorm(model, to="groupnorm")
        >>> type(conversion.model[1]).__name__, conversion.model[1].num_groups
        ('GroupNorm', 8)
    """
    if to not in ("groupnorm", "syncbatchnorm"):
        raise ConfigError(f"Unknown target {to!r}; choose 'groupnorm' or 'syncbatchnorm'.")
    if groups < 1:
        raise ConfigError(f"groups ({groups}) must be at least 1.")
    converted = copy.deepcopy(model)
    layers = find_batchnorm_layers(converted)
    if to == "syncbatchnorm":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(converted)
        changes = tuple(
            f"{layer.name}: {layer.kind}({layer.num_features}) -> SyncBatchNorm, "
            "weights and running statistics carried over"
            for layer in layers
            if layer.kind != "SyncBatchNorm"
        )
        return Conversion(converted, changes)
    changes = []
    for layer in layers:
        old = converted.get_submodule(layer.name)
        one_group = isinstance(old, nn.BatchNorm1d)  # may see (N, C): no positions to share
        num_groups = 1 if one_group else _largest_divisor_at_most(old.num_features, groups)
        new = nn.GroupNorm(num_groups, old.num_features, eps=old.eps, affine=old.affine)
        if old.affine:
            new = new.to(device=old.weight.device, dtype=old.weight.dtype)
            with _no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
        _set_submodule(converted, layer.name, new)
        carried = "weight and bias carried over" if old.affine else "no affine parameters"
        changes.append(
            f"{layer.name}: {layer.kind}({old.num_features}) -> GroupNorm({num_groups} groups), "
            f"{carried}, running statistics dropped"
        )
    return Conversion(converted, tuple(changes))


def _largest_divisor_at_most(channels: int, limit: int) -> int:
    return max(d for d in range(1, min(channels, limit) + 1) if channels % d == 0)


def _set_submodule(model: nn.Module, dotted_name: str, module: nn.Module) -> None:
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _no_grad():
    import torch

    return torch.no_grad()
