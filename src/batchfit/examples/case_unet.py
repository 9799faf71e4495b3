"""The batch-size guide's U-Net case, run for real with batchfit's own tools.

The guide (docs/case-unet.md quotes it) trains a U-Net for medical segmentation on a 12 GB card
at 256x256: "the model takes 3 GB, each image about 0.5 GB, so at most 18 fit and 16 is chosen;
validation IoU fluctuates a lot, so the batch may be too small; accumulate 4 steps (global 64)
with the rate 4x; the loss curve gets smoother and IoU improves by 5%". `run_unet_case` checks
each part:

1. Memory, at full size (`batchfit.examples.case_unet_memory`): the classic 31M-parameter
   U-Net (`batchfit.examples.unet_standard`) at 256x256 with fp32 Adam, predicted with fake
   tensors for a 12 GiB budget
   (`batchfit.memory.search.find_max_batch_size`, `confirm="never"`: the `predicted` basis, with
   the CUDA reserve of `batchfit.memory.cards.cuda_reserve_bytes`), next to the guide's formula
   (`batchfit.memory.model.max_batch_size`, as `batchfit estimate` computes it).
2. Training, at a size a CPU affords: the built-in small U-Net (`batchfit.examples.unet`, two
   levels, 16 base channels) on 64x64 generated shapes, 512 training and 128 validation images,
   the same number of epochs (samples) for each arm, `seeds` seeds each, with the library loop
   (`batchfit.training.loop.train`):
   - "b16": batch 16 at the reference rate 1e-3 (the task's rate; the case takes batch 16 as
     its reference point, as the guide's team had it);
   - "b64-accum": 16 x 4 accumulated = 64 at 4x the rate (linear rule, `batchfit.lr.scaling`)
     with the loop's default warmup;
   - "plan": what `batchfit.plan.planner.plan` advises for the task (measured once, with a
     shortened noise-scale and range-test measurement to keep the case cheap).
   Validation IoU is evaluated every `EVAL_SAMPLES` samples, per image (see `image_iou`).
3. Diagnosis: each run's metrics.jsonl read back (`batchfit.monitor.readers.read_history`) and
   diagnosed (`batchfit.monitor.diagnose.diagnose`), and the IoU alone checked for `noisy`.
4. The answer: IoU mean and spread over the last evaluations, loss spread, time, and each of
   the guide's claims judged (`batchfit.examples.case_unet_claims`; the result's shape is
   `batchfit.examples.case_unet_result`).

Everything is written under `out_dir`: runs/<arm>-seed<k>/ (metrics, checkpoint, diagnosis),
plan.json, case.json, case.md and the plots.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchfit.errors import ConfigError
from batchfit.examples.case_unet_claims import judge_claims
from batchfit.examples.case_unet_memory import compare_memory
from batchfit.examples.case_unet_result import ArmSummary, CaseResult, RunSummary
from batchfit.progress import ProgressFn, report
from batchfit.validation import check_whole_number

if TYPE_CHECKING:
    from torch import nn

    from batchfit.task import Task
    from batchfit.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EPOCHS", "case_task", "image_iou", "run_unet_case"]

REFERENCE_BATCH = 16
"""The guide's batch, which the case takes as the reference point of the rate."""

REFERENCE_LR = 1e-3
"""The built-in U-Net task's Adam rate, used at the reference batch."""

ACCUMULATION = 4
"""The guide's accumulation: 4 micro-batches of 16 per step, a global batch of 64."""

DEFAULT_EPOCHS = 6
"""Passes over the 512 training images per run: the small U-Net's IoU plateaus after about 3
at batch 16, and 9 runs of 6 stay well inside the 15-minute budget on 2 cores."""

EVAL_SAMPLES = 128
"""Samples trained between evaluations: 4 per epoch, the same for every arm."""

LAST_EVALUATIONS = 8
"""The IoU mean and spread are taken over the last 8 evaluations (the last two epochs)."""

PLAN_NOISE_BATCHES = 10
"""Big batches the plan's noise scale is measured over (its default is more): cheaper, wider
interval."""

PLAN_RANGE_TEST_STEPS = 40
"""Steps of the plan's range test (its default 60; 40 is the fewest its smoothing allows)."""

LOSS_GROUP_SAMPLES = 64
"""The loss spread is also measured over means of 64 samples, so arms compare at one noise
level per point: a 64-sample step's loss is already such a mean."""


def image_iou(model: nn.Module, batch: Any) -> float:
    """Mean over the batch's images of each image's intersection over union (logit > 0).

    The built-in example's `intersection_over_union` pools the pixels of the whole batch, so
    its value depends on how many images an evaluation batch holds; the loop evaluates in
    micro-batches, which differ between the arms (the plan's may be 2, the others' 16). A mean
    of per-image IoUs is the same whatever the batching. An image whose truth and prediction
    are both empty scores 1.

    Example:
        >>> import torch
        >>> class Ones(torch.nn.Module):
        ...     def forward(self, x): return torch.ones_like(x)
        >>> masks = torch.zeros(2, 1, 2, 2); masks[0, 0, 0, 0] = 1; masks[1] = 1
        >>> image_iou(Ones(), (torch.zeros(2, 1, 2, 2), masks))
        0.625
    """
    import torch

    images, masks = batch
    with torch.no_grad():
        predicted = model(images) > 0
    truth = masks > 0.5
    dims = tuple(range(1, truth.dim()))
    intersection = (predicted & truth).sum(dim=dims).double()
    union = (predicted | truth).sum(dim=dims).double()
    per_image = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    return float(per_image.mean())


def case_task() -> Task:
    """The built-in U-Net task with the case's reference point (batch 16 at 1e-3) and the
    per-image IoU (`image_iou`)."""
    from batchfit.examples.unet import task

    return dataclasses.replace(
        task(), batch_size=REFERENCE_BATCH, lr=REFERENCE_LR, metric=image_iou, name="unet-case"
    )


def _eval_every(global_batch: int, samples: int) -> int:
    return max(1, round(samples / global_batch))


def _arm_configs(task: Task, plan: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each arm's label and TrainConfig fields (seed and out_dir are added per run)."""
    from batchfit.training.config import TrainConfig

    accumulated = REFERENCE_BATCH * ACCUMULATION
    planned = TrainConfig.from_plan(plan).to_dict()
    return {
        "b16": (
            f"batch {REFERENCE_BATCH} at the reference rate",
            {"global_batch": REFERENCE_BATCH, "micro_batch": REFERENCE_BATCH, "lr": task.lr,
             "warmup": 0},
        ),
        "b64-accum": (
            f"{REFERENCE_BATCH} x {ACCUMULATION} accumulated = {accumulated}, rate x"
            f"{ACCUMULATION} (linear rule), default warmup",
            {"global_batch": accumulated, "micro_batch": REFERENCE_BATCH, "lr_rule": "linear"},
        ),
        "plan": (
            "batchfit's plan",
            {name: planned[name] for name in
             ("global_batch", "micro_batch", "lr", "warmup", "optimizer", "sync_batchnorm")},
        ),
    }  # fmt: skip


def run_unet_case(
    out_dir: str | Path,
    *,
    seeds: int = 3,
    epochs: float = DEFAULT_EPOCHS,
    task: Task | None = None,
    last_evaluations: int = LAST_EVALUATIONS,
    eval_samples: int = EVAL_SAMPLES,
    progress: ProgressFn | None = None,
) -> CaseResult:
    """Run the guide's U-Net case and write its table, result and plots under `out_dir`.

    Args:
        out_dir: folder for the runs, plan.json, case.json, case.md and the plots (created;
            runs already there are started afresh).
        seeds: seeds per arm (0, 1, ...).
        epochs: passes over the training data per run, the same for every arm.
        task: the small task to train (default `case_task()`); tests pass a tinier one.
        last_evaluations: evaluations the IoU mean and spread are taken over.
        eval_samples: samples trained between evaluations, the same for every arm.
        progress: `progress(phase, done, total)` (`batchfit.progress`): phase "memory", then
            "plan: <phase>" while the plan measures, then "train" counting optimizer steps
            over all runs.

    Returns:
        The CaseResult (also written as case.json and case.md).

    Raises:
        ConfigError: seeds, epochs, last_evaluations or eval_samples not positive.

    Example:
        >>> result = run_unet_case("runs/case-unet")  # doctest: +SKIP
        >>> [claim.verdict for claim in result.claims]  # doctest: +SKIP
    """
    from batchfit.files import write_atomic
    from batchfit.plan.planner import plan as make_plan
    from batchfit.plots.case_unet import plot_case
    from batchfit.training.config import TrainConfig, resolve_setup

    seeds = check_whole_number("seeds", seeds)
    last_evaluations = check_whole_number("last_evaluations", last_evaluations)
    eval_samples = check_whole_number("eval_samples", eval_samples)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
        raise ConfigError(f"epochs must be a positive number, got {epochs!r}.")
    started = time.perf_counter()
    out = Path(out_dir)
    built_in = task is None
    task = case_task() if task is None else task

    report(progress, "memory", 0, 1)
    memory = compare_memory()
    report(progress, "memory", 1, 1)

    plan = make_plan(
        task,
        device="cpu",
        epochs=epochs,
        noise_batches=PLAN_NOISE_BATCHES,
        range_test_steps=PLAN_RANGE_TEST_STEPS,
        progress=lambda phase, done, total: report(progress, f"plan: {phase}", done, total),
    )
    plan.save(out / "plan.json")

    arms = _arm_configs(task, plan)
    configs = {
        (arm, seed): TrainConfig(
            **fields,
            epochs=epochs,
            seed=seed,
            eval_every=_eval_every(fields["global_batch"], eval_samples),
            checkpoint_every=0,
            out_dir=str(out / "runs" / f"{arm}-seed{seed}"),
        )
        for arm, (_, fields) in arms.items()
        for seed in range(seeds)
    }
    total = sum(resolve_setup(task, config).total_steps for config in configs.values())
    runs = []
    done = 0
    for (arm, seed), config in configs.items():
        run, steps = _run(task, arm, seed, config, last_evaluations, progress, done, total)
        runs.append(run)
        done += steps
    summaries = tuple(
        ArmSummary.of(arm, label, [run for run in runs if run.arm == arm])
        for arm, (label, _) in arms.items()
    )
    plan_data = {key: value for key, value in plan.to_dict().items() if key != "measurements"}
    training = {
        "task": (
            "built-in small U-Net (batchfit.examples.unet: 2 levels, 16 base channels"
            if built_in
            else f"task {task.name!r} (given"
        )
        + f", {sum(p.numel() for p in task.make_model().parameters()):,} parameters)"
        + (" on generated 64x64 shapes, Adam" if built_in else ""),
        "images": f"{len(task.train_data)} training, {len(task.val_data or ())} validation",
        "epochs": epochs,
        "seeds": seeds,
        "schedule": "cosine decay to 0 after the warmup (the loop's default), for every arm",
        "evaluation": (
            f"validation loss and per-image IoU every {eval_samples} samples "
            f"(eval_every = {eval_samples} / global batch)"
        ),
        "last_evaluations": last_evaluations,
        "plan measured with": (
            f"noise_batches={PLAN_NOISE_BATCHES}, range_test_steps={PLAN_RANGE_TEST_STEPS}, "
            "on the CPU with no memory budget"
        ),
    }
    result = CaseResult(
        memory=memory,
        training=training,
        plan=plan_data,
        runs=tuple(runs),
        arms=summaries,
        claims=judge_claims(memory, summaries),
        seconds=time.perf_counter() - started,
    )
    files = {name: str(path) for name, path in plot_case(result, out).items()}
    files["table"] = str(out / "case.md")
    files["result"] = str(out / "case.json")
    result = dataclasses.replace(result, files=files)
    write_atomic(out / "case.md", result.markdown())
    write_atomic(out / "case.json", _json(result.to_dict()))
    return result


def _json(data: dict[str, Any]) -> str:
    from batchfit.files import json_text

    return json_text(data, default=str) + "\n"


def _run(
    task: Task,
    arm: str,
    seed: int,
    config: TrainConfig,
    last_evaluations: int,
    progress: ProgressFn | None,
    done: int,
    total: int,
) -> tuple[RunSummary, int]:
    """Train one arm at one seed, diagnose it from its folder; (summary, steps run)."""
    import shutil

    from batchfit.training.loop import train

    run_dir = Path(config.out_dir or ".")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a case run starts afresh; train() would refuse a used folder
    logger.info("case unet: %s seed %d", arm, seed)

    def step_progress(phase: str, steps: int, run_total: int | None) -> None:
        report(progress, "train", done + steps, total)

    result = train(task, config, device="cpu", progress=step_progress)
    return _summarize(arm, seed, result, run_dir, last_evaluations), result.steps


def _summarize(
    arm: str, seed: int, result: Any, run_dir: Path, last_evaluations: int
) -> RunSummary:
    """A run's IoU, loss spread and findings, read back from its metrics.jsonl."""
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.findings import write_diagnosis
    from batchfit.monitor.readers import read_history

    history = read_history(run_dir, metric="val_iou")
    diagnosis = diagnose(history)
    write_diagnosis(diagnosis, run_dir / "diagnosis.json")
    iou_only = diagnose(dataclasses.replace(history, train_loss=_empty(history.train_loss)))
    noisy = iou_only.get("noisy")
    ious = list(history.metric.finite().values) if history.metric is not None else []
    last = ious[-last_evaluations:]
    return RunSummary(
        arm=arm,
        seed=seed,
        global_batch=result.global_batch,
        micro_batch=result.micro_batch,
        accumulation_steps=result.accumulation_steps,
        lr=result.lr,
        warmup_steps=result.warmup_steps,
        steps=result.steps,
        samples=result.samples_seen,
        seconds=result.seconds,
        evaluations=len(ious),
        final_iou=ious[-1] if ious else float("nan"),
        last_iou_mean=statistics.fmean(last) if last else float("nan"),
        last_iou_std=statistics.pstdev(last) if last else float("nan"),
        best_iou=max(ious, default=float("nan")),
        loss_spread=_loss_spread(history.train_loss, 1),
        loss_spread_64=_loss_spread(
            history.train_loss, _group(result.global_batch, LOSS_GROUP_SAMPLES)
        ),
        findings=tuple(diagnosis.kinds()),
        iou_noisy=noisy is not None,
        iou_zigzag=None if noisy is None else noisy.evidence.get("zigzag"),
        run_dir=str(run_dir),
        curves={
            "arm": arm,
            "seed": seed,
            "samples": [step * result.global_batch for step in history.train_loss.steps],
            "loss": list(history.train_loss.values),
            "iou_samples": [step * result.global_batch for step in history.metric.steps]
            if history.metric is not None
            else [],
            "iou": ious,
        },
    )


def _empty(series: Any) -> Any:
    return dataclasses.replace(series, steps=(), values=())


def _group(global_batch: int, samples: int) -> int | None:
    """Steps per `samples`-sample mean, or None when the global batch does not divide it."""
    return samples // global_batch if samples % global_batch == 0 else None


def _loss_spread(series: Any, group: int | None) -> float | None:
    """The monitor's relative spread of the loss, over means of `group` consecutive steps."""
    from batchfit.monitor.curve import read_curve
    from batchfit.monitor.findings import MIN_POINTS
    from batchfit.monitor.history import Series

    if group is None:
        return None
    finite = series.finite()
    count = len(finite) // group
    if count < MIN_POINTS:
        return None
    points = [
        (
            finite.steps[(i + 1) * group - 1],
            statistics.fmean(finite.values[i * group : (i + 1) * group]),
        )
        for i in range(count)
    ]
    return read_curve(Series.from_points(series.name, points)).relative_spread
