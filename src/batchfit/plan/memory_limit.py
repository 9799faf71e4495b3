"""The plan's first measurement: the largest micro-batch that fits, and how memory grows.

On the CPU without a budget there is no limit worth searching: the data bounds the batch, and
the memory model still shows how memory grows per sample. Under a budget (or on a card) it is
`batchfit.memory.search.find_max_batch_size`, with what the plan keeps of its result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchfit.progress import ProgressFn
from batchfit.units import format_bytes

if TYPE_CHECKING:
    import torch

    from batchfit.task import Task


def memory_limit(
    task: Task,
    device: torch.device,
    budget: int | str | None,
    margin: float,
    dataset_size: int,
    report: ProgressFn,
    *,
    points: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """The largest micro-batch that fits, and the memory measurements for the plan."""
    from batchfit.memory.predict import predict_memory_model
    from batchfit.memory.runnable import host_limit_batch_size
    from batchfit.memory.search import capped_note, find_max_batch_size
    from batchfit.plan.norm_layers import smallest_batch

    report("memory", 0, 1)
    if budget is None and device.type == "cpu":
        # The CPU has no memory limit worth searching: bound by the data, and still show how
        # memory grows with the batch.
        # Batch 1 cannot train a model with BatchNorm (one value per channel): start at 2.
        low = min(smallest_batch(task.make_model()), dataset_size)
        model = predict_memory_model(
            task,
            low=low,
            high=dataset_size,
            device=device,
            **({"points": points} if points else {}),
        )
        report("memory", 1, 1)
        # said here: a quick plan probes fewer sizes only on this path, not under a budget
        probed = f" (from {len(model.batch_sizes)} batch sizes: a quick plan's)" if points else ""
        return dataset_size, {
            "capacity_bytes": None,
            "fixed_bytes": model.fixed_bytes,
            "per_sample_bytes": model.per_sample_bytes,
            "limit_batch": dataset_size,
            "probes": [list(pair) for pair in zip(model.batch_sizes, model.peak_bytes)],
            "trials": [],
            "notes": [
                f"No memory budget on the CPU: the micro-batch is bounded by the {dataset_size} "
                f"training samples; memory grows {format_bytes(model.per_sample_bytes)} per "
                f"sample{probed}. Give --memory-budget to plan for a GPU's memory."
            ],
        }
    result = find_max_batch_size(
        task,
        device=device,
        memory_budget=budget,
        margin=margin,
        max_batch_size=dataset_size,
    )
    report("memory", 1, 1)
    model = result.memory_model
    notes = list(result.notes)
    if result.capped:
        # the plan searches up to the training set, and `batchfit plan` has no --max-batch
        notes = [note for note in notes if note != capped_note(dataset_size)]
        notes.append(
            f"Every batch up to the {dataset_size:,} training samples fits in memory: the data, "
            "not the memory, bounds the micro-batch."
        )
    if result.basis == "predicted":
        notes.append(f"Micro-batch limit {result.limit_batch_size}: {result.basis_reason}")
    # The largest batch this machine holds, for the steps the plan still runs here.
    host_limit = host_limit_batch_size(result, device)
    return result.limit_batch_size, {
        "basis": result.basis,
        "basis_reason": result.basis_reason,
        "reserve_bytes": result.reserve_bytes,
        "card": result.card,
        "host_limit_batch": host_limit,
        "capacity_bytes": result.budget_bytes,
        "usable_bytes": result.usable_bytes,
        "margin": result.margin,
        "fixed_bytes": None if model is None else model.fixed_bytes,
        "per_sample_bytes": None if model is None else model.per_sample_bytes,
        "limit_batch": result.limit_batch_size,
        "method": result.method,
        "real_steps": result.real_steps,
        "probes": [list(pair) for pair in result.predictions],
        "trials": [
            {
                "batch_size": trial.batch_size,
                "fits": trial.fits,
                "measured_bytes": trial.measured_peak_bytes,
                "predicted_bytes": trial.predicted_peak_bytes,
            }
            for trial in result.trials
        ],
        "notes": notes,
    }
