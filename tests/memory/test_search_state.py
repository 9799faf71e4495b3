"""Tests for batchfit.memory.search_state: the errors and memory model shared by both searches."""

import pytest
import torch

from batchfit.errors import DoesNotFitError
from batchfit.memory.result import Trial
from batchfit.memory.search_state import SearchState, error_line

MiB = 1024**2


def _state(usable: int = 95 * MiB, budget: int = 100 * MiB) -> SearchState:
    return SearchState(torch.device("cpu"), usable, budget, 1024, lambda message: None)


def test_errors_name_the_budget_and_the_margin():
    state = _state()
    error = state.does_not_fit(200 * MiB)
    assert isinstance(error, DoesNotFitError)
    assert "batch size 1 needs 200" in str(error) and "after the margin" in str(error)
    assert "batch size 1 fails" in str(state.does_not_fit(None))
    assert "before the first sample" in str(_state(budget=95 * MiB).state_too_large(MiB))
    assert "after the margin" not in _state(budget=95 * MiB).budget_text()


def test_memory_model_prefers_points_near_the_limit_and_counts_trials():
    state = _state()
    assert state.memory_model(100) is None  # nothing predicted or measured yet
    state.predictions += [(1, 10_000), (80, 90_000), (100, 110_000)]
    model = state.memory_model(100)  # 1 is below limit/4: left out
    assert model.per_sample_bytes == 1000 and model.fixed_bytes == 10_000
    state.predictions.clear()
    state.trials.append(Trial(40, True, None, 50_000, None, 1, 0.1))
    state.trials.append(Trial(60, True, None, 70_000, None, 1, 0.1))
    assert state.memory_model(60).per_sample_bytes == 1000


def test_memory_model_follows_real_trials_where_predictions_disagree():
    # Predictions that missed memory (an LSTM's workspace) made the model: "388.73 KiB per
    # sample" printed beside real trials that grew 1.85 MiB per sample.
    state = _state()
    state.predictions += [(80, 90_000), (90, 100_000), (100, 110_000)]
    state.trials.append(Trial(90, True, 100_000, 190_000, None, 2, 0.1))
    state.trials.append(Trial(100, True, 110_000, 210_000, None, 2, 0.1))
    model = state.memory_model(100)
    assert model.per_sample_bytes == 2000 and model.batch_sizes == (90, 100)
    # One measurement cannot make a line: it stands in for the prediction at its batch.
    state.trials.pop()
    assert dict(zip(state.memory_model(100).batch_sizes, state.memory_model(100).peak_bytes)) == {
        80: 90_000,
        90: 190_000,
        100: 110_000,
    }


def test_error_line_is_the_first_line_or_the_type():
    assert error_line(RuntimeError("CUDA out of memory.\nTried to allocate")) == (
        "CUDA out of memory."
    )
    assert error_line(MemoryError()) == "MemoryError"


def test_error_line_says_a_memory_budget_was_exceeded_not_cuda():
    from batchfit.memory.counter import count_memory

    with pytest.raises(torch.OutOfMemoryError) as caught, count_memory(budget_bytes=1024):
        torch.zeros(4096)
    assert str(caught.value).startswith("CUDA out of memory.")  # for code that matches it
    line = error_line(caught.value)
    assert line.startswith("memory budget exceeded: tried to allocate 16.00 KiB")
    assert "CUDA" not in line and "1.00 KiB budget" in line
