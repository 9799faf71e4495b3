"""Tests for batchfit.memory.result: the shape of a batch-size search's answer."""

import json

from batchfit.memory.model import fit_memory_model
from batchfit.memory.result import SearchResult, Trial


def _trial(batch_size: int, fits: bool) -> Trial:
    return Trial(
        batch_size=batch_size,
        fits=fits,
        predicted_peak_bytes=1000 * batch_size,
        measured_peak_bytes=1000 * batch_size if fits else None,
        allocator_peak_bytes=None,
        steps=2,
        seconds=0.5,
        error=None if fits else "CUDA out of memory",
    )


def test_to_dict_counts_out_of_memory_trials_and_is_json():
    result = SearchResult(
        batch_size=96,
        limit_batch_size=100,
        budget_bytes=110_000,
        usable_bytes=104_500,
        margin=0.05,
        round_to=32,
        device="cpu",
        method="predicted",
        memory_model=fit_memory_model([50, 100], [50_000, 100_000]),
        state_bytes=4096,
        trials=(_trial(100, True), _trial(101, False)),
        predictions=((2, 2000), (64, 64_000)),
        real_steps=4,
        seconds=1.0,
        fake_runs=2,
    )
    assert result.oom_errors == 1
    data = json.loads(json.dumps(result.to_dict()))
    assert data["oom_errors"] == 1 and data["capped"] is False and data["notes"] == []
    assert data["predictions"] == [
        {"batch_size": 2, "peak_bytes": 2000},
        {"batch_size": 64, "peak_bytes": 64_000},
    ]
    assert data["trials"][1] == _trial(101, False).to_dict()
    assert data["memory_model"]["per_sample_bytes"] == 1000
