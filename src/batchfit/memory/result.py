"""What a batch-size search returns: each real trial, and the answer with how it was found.

`batchfit.memory.search.find_max_batch_size` builds these; the CLI, the planner and the report read
them through `to_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from batchfit.memory.rounding import RoundTo

# What a fake-tensor prediction counts, and what it leaves out (said on every predicted result).
PREDICTION_COVERS = (
    "tensor storage of parameters, buffers, gradients, optimizer state, the batch, and the "
    "activations and temporaries of the training steps (each storage rounded up to 512 bytes, "
    "as the CUDA caching allocator does), as the CPU kernels allocate them; for a CUDA card, "
    "attention with dropout as its fused kernels run it and the optimizer's multi-tensor step "
    "(on an H100 the count of the card's own steps agreed within 0.1%)"
)
PREDICTION_OMITS = (
    "the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation "
    "(reserve_bytes stands in for these on a predicted answer; on an H100 every predicted "
    "largest batch ran), and other intermediates a CUDA kernel chooses differently from the "
    "CPU one"
)

if TYPE_CHECKING:
    from batchfit.memory.model import MemoryModel

Method = Literal["predicted", "measured-probes", "step"]

Basis = Literal["confirmed", "predicted"]
"""How far the answer is checked: "confirmed" by real training steps on this machine, or
"predicted" from fake-tensor predictions alone (a budget for another device)."""


@dataclass(frozen=True)
class Trial:
    """One real trial: training steps at one batch size.

    Attributes:
        batch_size: samples per step.
        fits: whether the steps ran without running out of memory.
        predicted_peak_bytes: the prediction for this batch, when there was one.
        measured_peak_bytes: counted peak of live tensor storage (see batchfit.memory.step), or on
            CUDA with a step callable the allocator's peak; None when the trial failed or
            nothing was counted.
        allocator_peak_bytes: the CUDA allocator's peak; None off CUDA.
        steps: real training steps run (the last one failing when `fits` is False).
        seconds: wall time of the trial.
        error: the first line of the out-of-memory error when it did not fit.
    """

    batch_size: int
    fits: bool
    predicted_peak_bytes: int | None
    measured_peak_bytes: int | None
    allocator_peak_bytes: int | None
    steps: int
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "fits": self.fits,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "measured_peak_bytes": self.measured_peak_bytes,
            "allocator_peak_bytes": self.allocator_peak_bytes,
            "steps": self.steps,
            "seconds": self.seconds,
            "error": self.error,
        }


@dataclass(frozen=True)
class SearchResult:
    """The largest batch that fits, and how it was found.

    Attributes:
        batch_size: the answer: `limit_batch_size` rounded down as `round_to` asks.
        limit_batch_size: the largest batch whose peak memory fits the usable memory.
        budget_bytes: the memory budget, or the device's total memory when none was given.
        usable_bytes: (budget_bytes - reserve_bytes) * (1 - margin), rounded down: what the
            limit must fit.
        margin: the fraction of the budget kept free.
        round_to: None, "pow2" or a multiple.
        device: the device searched on.
        method: "predicted" (fake-tensor prediction, confirmed by real trials),
            "measured-probes" (fake mode could not run the task; real probes only) or
            "step" (a user's step callable).
        memory_model: fixed + per-sample bytes fitted over the predicted and measured points
            from a quarter of the limit up (predictions above the limit among them: a batch
            that does not fit still tells how memory grows), with its residual; None when
            nothing was measured or predicted.
        state_bytes: parameters, buffers, gradients and optimizer state (before the first
            sample), when known.
        trials: every real trial, in order.
        predictions: (batch size, predicted peak bytes) of every prediction made, in order.
        fake_runs: how many of those ran fake-tensor training steps (the others came from the
            exact peak formula, see `batchfit.memory.predict.PeakFormula`).
        real_steps: real training steps run in all (for a step callable: calls of it).
        seconds: wall time of the whole search.
        capped: True when even `max_batch_size` fitted: the limit is at least that.
        notes: things the user should know (fallbacks, repeated samples, the cap).
        basis: "confirmed" (real steps on this machine) or "predicted" (the prediction alone).
        basis_reason: why, in one line.
        reserve_bytes: memory taken off the budget before the margin (a CUDA card's context,
            workspaces and fragmentation when predicted for another device; else 0).
        card: the named card searched for, when one was (see `batchfit.memory.cards`).
        precision: "32", "bf16-mixed" or "fp16-mixed".
        attention: how scaled_dot_product_attention ran in the predictions: "none", "fused"
            or "math" (the attention matrix was stored: an upper bound for a CUDA card).
    """

    batch_size: int
    limit_batch_size: int
    budget_bytes: int
    usable_bytes: int
    margin: float
    round_to: RoundTo
    device: str
    method: Method
    memory_model: MemoryModel | None
    state_bytes: int | None
    trials: tuple[Trial, ...]
    predictions: tuple[tuple[int, int], ...]
    real_steps: int
    seconds: float
    fake_runs: int = 0
    capped: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    basis: Basis = "confirmed"
    basis_reason: str = ""
    reserve_bytes: int = 0
    card: str | None = None
    precision: str = "32"
    attention: str = "none"

    @property
    def oom_errors(self) -> int:
        """How many trials ran out of memory."""
        return sum(not trial.fits for trial in self.trials)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "limit_batch_size": self.limit_batch_size,
            "budget_bytes": self.budget_bytes,
            "usable_bytes": self.usable_bytes,
            "margin": self.margin,
            "round_to": self.round_to,
            "device": self.device,
            "method": self.method,
            "memory_model": None if self.memory_model is None else self.memory_model.to_dict(),
            "state_bytes": self.state_bytes,
            "trials": [trial.to_dict() for trial in self.trials],
            "predictions": [
                {"batch_size": size, "peak_bytes": peak} for size, peak in self.predictions
            ],
            "fake_runs": self.fake_runs,
            "real_steps": self.real_steps,
            "oom_errors": self.oom_errors,
            "seconds": self.seconds,
            "capped": self.capped,
            "notes": list(self.notes),
            "basis": self.basis,
            "basis_reason": self.basis_reason,
            "reserve_bytes": self.reserve_bytes,
            "card": self.card,
            "precision": self.precision,
            "attention": self.attention,
            "prediction_covers": PREDICTION_COVERS if self.method == "predicted" else None,
            "prediction_omits": PREDICTION_OMITS if self.method == "predicted" else None,
        }
