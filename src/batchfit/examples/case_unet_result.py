"""What the U-Net case found: the memory arithmetic, each run, each arm, and the guide's claims.

`batchfit.examples.case_unet.run_unet_case` builds these; `batchfit case unet` prints them, and
`CaseResult.markdown()` is the table docs/case-unet.md quotes. Every number comes from the run;
the claims are judged by the fixed thresholds below, so the same numbers give the same reading.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from batchfit.units import format_bytes

__all__ = [
    "GUIDE_IOU_GAIN",
    "ArmSummary",
    "CaseResult",
    "Claim",
    "MemoryComparison",
    "RunSummary",
]

GUIDE_IOU_GAIN = 0.05
"""The guide's promised gain: "IoU improved by 5%" (read as relative: 0.80 -> 0.84)."""


@dataclass(frozen=True)
class MemoryComparison:
    """The guide's arithmetic next to batchfit's fake-tensor prediction of the same question.

    Attributes:
        model: the model predicted, in words.
        parameters: its parameter count.
        image_size: images are image_size x image_size, one channel.
        precision: "32" (fp32 weights, gradients, Adam state and activations).
        card_bytes: the card's memory (12 GiB).
        guide_card_bytes, guide_model_bytes, guide_per_image_bytes: the guide's 12 GB, 3 GB and
            0.5 GB (decimal units, as `batchfit estimate --memory 12GB` reads them).
        guide_limit_batch, guide_batch: the guide's formula answer (18) and its power of two
            (16), from `batchfit.memory.model.max_batch_size`.
        state_bytes: weights, gradients and Adam's two moments: what the model holds before the
            first image.
        fixed_bytes, per_image_bytes: the straight line fitted to the predicted peaks.
        reserve_bytes: what batchfit keeps free for CUDA itself (`cuda_reserve_bytes`).
        margin: the fraction of the rest kept free.
        usable_bytes: (card - reserve) x (1 - margin).
        limit_batch: the largest batch whose predicted peak fits the usable memory.
        batch: the power of two chosen from it.
        peak_bytes_at_batch: the predicted peak at `batch`.
        formula_limit_batch: the guide's formula on batchfit's fixed and per-image bytes, with
            no reserve and no margin: what the reserve and margin cost.
        seconds: time the prediction took.
    """

    model: str
    parameters: int
    image_size: int
    precision: str
    card_bytes: int
    guide_card_bytes: int
    guide_model_bytes: int
    guide_per_image_bytes: int
    guide_limit_batch: int
    guide_batch: int
    state_bytes: int
    fixed_bytes: float
    per_image_bytes: float
    reserve_bytes: int
    margin: float
    usable_bytes: int
    limit_batch: int
    batch: int
    peak_bytes_at_batch: int
    formula_limit_batch: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str, str]]:
        """(quantity, the guide, batchfit) rows for a table."""
        return [
            ("card", f"{self.guide_card_bytes / 1e9:g} GB", format_bytes(self.card_bytes)),
            (
                "model before the first image",
                f"{self.guide_model_bytes / 1e9:g} GB",
                f"{format_bytes(self.state_bytes)} (weights, gradients, Adam moments; "
                f"line intercept {format_bytes(self.fixed_bytes)})",
            ),
            (
                "each image",
                f"{self.guide_per_image_bytes / 1e9:g} GB",
                format_bytes(self.per_image_bytes),
            ),
            (
                "kept free",
                "nothing",
                f"{format_bytes(self.reserve_bytes)} CUDA reserve + {self.margin:.0%} margin",
            ),
            ("largest batch", str(self.guide_limit_batch), str(self.limit_batch)),
            ("power of two chosen", str(self.guide_batch), str(self.batch)),
        ]

    def explanation(self) -> str:
        """Why the two answers differ, in words, with the numbers."""
        weights = 4 * self.parameters
        if self.batch == self.guide_batch:
            rounded = f"Rounded down to a power of two, both give {self.batch}"
        else:
            rounded = f"Rounded down to a power of two: {self.guide_batch} vs {self.batch}"
        return (
            f"The guide's {self.guide_model_bytes / 1e9:g} GB for the model is "
            f"{self.guide_model_bytes / self.state_bytes:.1f}x what {self.parameters / 1e6:.1f}M "
            f"fp32 parameters need with Adam: weights {format_bytes(weights)}, gradients as much, "
            f"and Adam's two moments twice that, {format_bytes(self.state_bytes)} in all "
            f"(16 bytes per parameter). Each {self.image_size}x{self.image_size} image adds "
            f"{format_bytes(self.per_image_bytes)} (activations saved for backward at 64 to "
            f"1024 channels), {self.per_image_bytes / self.guide_per_image_bytes:.2f}x the "
            f"guide's {self.guide_per_image_bytes / 1e9:g} GB. The guide keeps nothing free; "
            f"batchfit keeps {format_bytes(self.reserve_bytes)} for the CUDA context, library "
            f"workspaces and allocator fragmentation (memory/cards.py) and a {self.margin:.0%} "
            f"margin, leaving {format_bytes(self.usable_bytes)}: {self.limit_batch} images fit "
            f"(without the reserve and margin, {self.formula_limit_batch}). {rounded}; at "
            f"{self.batch} the predicted peak is {format_bytes(self.peak_bytes_at_batch)}."
        )


@dataclass(frozen=True)
class RunSummary:
    """One training run of one arm and seed.

    Attributes:
        arm: the arm's name ("b16", "b64-accum", "plan").
        seed: the run's seed.
        global_batch, micro_batch, accumulation_steps: samples per step, per micro-batch, and
            micro-batches per step.
        lr: the peak rate; warmup_steps: its warmup.
        steps: optimizer steps; samples: samples trained on.
        seconds: wall time of training and evaluation.
        evaluations: validation points logged.
        final_iou: validation IoU at the end.
        last_iou_mean, last_iou_std: mean and standard deviation of the last `last_evaluations`
            IoU values.
        best_iou: the best IoU seen.
        loss_spread: the monitor's relative spread of the training loss (`Curve.relative_spread`:
            90th percentile of |loss - trend| / level over the second half), per logged step.
        loss_spread_64: the same over means of 64 samples (steps grouped by 64 / global batch);
            None when the global batch does not divide 64.
        findings: the monitor's finding kinds on the whole run.
        iou_noisy: whether the monitor finds the validation IoU alone `noisy`.
        iou_zigzag: the IoU path length over its range (the monitor's measure), when computed.
        run_dir: the run's folder (metrics.jsonl).
        curves: the loss and IoU against samples seen, for the plots (`batchfit.plots.case_unet`);
            not in `to_dict()` (metrics.jsonl holds them).
    """

    arm: str
    seed: int
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float
    warmup_steps: int
    steps: int
    samples: int
    seconds: float
    evaluations: int
    final_iou: float
    last_iou_mean: float
    last_iou_std: float
    best_iou: float
    loss_spread: float | None
    loss_spread_64: float | None
    findings: tuple[str, ...]
    iou_noisy: bool
    iou_zigzag: float | None
    run_dir: str
    curves: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["curves"]
        data["findings"] = list(self.findings)
        return data


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class ArmSummary:
    """One arm over its seeds.

    Attributes:
        arm: the arm's name; label: what it is, in words.
        global_batch, micro_batch, accumulation_steps, lr, warmup_steps: its settings.
        seeds: runs.
        iou_mean: mean over seeds of each run's last-evaluations IoU mean.
        iou_low, iou_high: the lowest and highest of those run means.
        iou_std: mean over seeds of each run's last-evaluations IoU standard deviation.
        loss_spread, loss_spread_64: means over seeds (see `RunSummary`).
        iou_noisy_runs: runs whose IoU the monitor calls noisy.
        seconds: mean wall time per run.
    """

    arm: str
    label: str
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float
    warmup_steps: int
    seeds: int
    iou_mean: float
    iou_low: float
    iou_high: float
    iou_std: float
    loss_spread: float | None
    loss_spread_64: float | None
    iou_noisy_runs: int
    seconds: float

    @classmethod
    def of(cls, arm: str, label: str, runs: list[RunSummary]) -> ArmSummary:
        """The summary of `runs` (one arm, at least one seed)."""
        first = runs[0]
        means = [run.last_iou_mean for run in runs]
        spreads = [run.loss_spread for run in runs if run.loss_spread is not None]
        spreads_64 = [run.loss_spread_64 for run in runs if run.loss_spread_64 is not None]
        return cls(
            arm=arm,
            label=label,
            global_batch=first.global_batch,
            micro_batch=first.micro_batch,
            accumulation_steps=first.accumulation_steps,
            lr=first.lr,
            warmup_steps=first.warmup_steps,
            seeds=len(runs),
            iou_mean=statistics.fmean(means),
            iou_low=min(means),
            iou_high=max(means),
            iou_std=statistics.fmean(run.last_iou_std for run in runs),
            loss_spread=_mean(spreads),
            loss_spread_64=_mean(spreads_64),
            iou_noisy_runs=sum(run.iou_noisy for run in runs),
            seconds=statistics.fmean(run.seconds for run in runs),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Claim:
    """One claim of the guide and how it fared here.

    Attributes:
        claim: the guide's words, shortened.
        verdict: "held", "roughly" (the right size, not the number), "did not hold", or
            "cannot tell".
        evidence: the numbers, and the rule the verdict follows, in words.
    """

    claim: str
    verdict: str
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True)
class CaseResult:
    """The whole case: memory, the training setting, every run, every arm, the claims.

    Attributes:
        memory: the memory comparison at full size.
        training: what was trained and how, in words and numbers (task, images, epochs, ...).
        plan: the plan batchfit made for the small task (`Plan.to_dict()` without measurements).
        runs: every run.
        arms: one summary per arm, in the order run.
        claims: the guide's claims, judged.
        seconds: wall time of the whole case.
        files: what was written, by role (table, result, plots).
    """

    memory: MemoryComparison
    training: dict[str, Any]
    plan: dict[str, Any]
    runs: tuple[RunSummary, ...]
    arms: tuple[ArmSummary, ...]
    claims: tuple[Claim, ...]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory": self.memory.to_dict(),
            "training": self.training,
            "plan": self.plan,
            "runs": [run.to_dict() for run in self.runs],
            "arms": [arm.to_dict() for arm in self.arms],
            "claims": [claim.to_dict() for claim in self.claims],
            "seconds": self.seconds,
            "files": dict(self.files),
        }

    def arm_rows(self) -> tuple[list[str], list[list[str]]]:
        """The per-arm table: header, then one row per arm."""
        last = self.training["last_evaluations"]
        if self.runs:  # runs with fewer evaluations than that average what they have
            last = min(last, max(run.evaluations for run in self.runs))
        header = [
            "arm",
            "batch (micro x accum)",
            "lr",
            "warmup",
            f"IoU, last {last} evals (seed range)",
            "IoU std within run",
            "IoU noisy (runs)",
            "loss spread / step",
            "loss spread / 64 samples",
            "s per run",
        ]
        rows = [
            [
                arm.arm,
                f"{arm.global_batch} ({arm.micro_batch} x {arm.accumulation_steps})",
                f"{arm.lr:.3g}",
                str(arm.warmup_steps),
                f"{arm.iou_mean:.4f} ({arm.iou_low:.4f}-{arm.iou_high:.4f})",
                f"{arm.iou_std:.4f}",
                f"{arm.iou_noisy_runs}/{arm.seeds}",
                _format(arm.loss_spread, ".3f"),
                _format(arm.loss_spread_64, ".3f"),
                f"{arm.seconds:.0f}",
            ]
            for arm in self.arms
        ]
        return header, rows

    def run_rows(self) -> tuple[list[str], list[list[str]]]:
        """The per-run table: header, then one row per run."""
        header = ["arm", "seed", "steps", "final IoU", "last IoU mean", "std", "findings", "s"]
        rows = [
            [
                run.arm,
                str(run.seed),
                str(run.steps),
                f"{run.final_iou:.4f}",
                f"{run.last_iou_mean:.4f}",
                f"{run.last_iou_std:.4f}",
                ", ".join(run.findings) or "none",
                f"{run.seconds:.0f}",
            ]
            for run in self.runs
        ]
        return header, rows

    def markdown(self) -> str:
        """The tables and the claims as Markdown (what docs/case-unet.md quotes)."""
        lines = ["## Memory: the guide's arithmetic and batchfit's prediction", ""]
        lines += _markdown_table(["", "the guide", "batchfit"], self.memory.rows())
        lines += ["", self.memory.explanation(), "", "## Training", ""]
        lines += [f"- {key}: {value}" for key, value in self.training.items()]
        lines += ["", "### Arms", ""]
        lines += _markdown_table(*self.arm_rows())
        lines += ["", "### Runs", ""]
        lines += _markdown_table(*self.run_rows())
        lines += ["", "## The guide's claims", ""]
        lines += _markdown_table(
            ["claim", "here", "evidence"],
            [(claim.claim, claim.verdict, claim.evidence) for claim in self.claims],
        )
        lines += ["", f"Whole case: {self.seconds:.0f} s.", ""]
        return "\n".join(lines)


def _markdown_table(header: list[str], rows: Any) -> list[str]:
    def cells(values: Any) -> str:
        return "| " + " | ".join(str(value).replace("|", "/") for value in values) + " |"

    return [cells(header), cells(["---"] * len(header)), *(cells(row) for row in rows)]
