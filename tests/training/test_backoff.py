import pytest
import torch

from batchfit.errors import ConfigError, DoesNotFitError
from batchfit.training.backoff import next_micro_batch, run_with_backoff


def test_next_micro_batch_halves_to_a_divisor():
    assert next_micro_batch(32, 256) == 16
    assert next_micro_batch(28, 56) == 14
    assert next_micro_batch(14, 56) == 7
    assert next_micro_batch(7, 56) == 2  # 3 does not divide 56
    assert next_micro_batch(7, 56, allow_uneven=True) == 3


def test_next_micro_batch_below_one_does_not_fit():
    with pytest.raises(DoesNotFitError, match="micro-batch of 1"):
        next_micro_batch(1, 64)


def _fits_up_to(limit, tried):
    def attempt(size):
        tried.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"Tried to allocate {size} samples")
        return f"ran at {size}"

    return attempt


def test_backoff_sequence_cleanup_and_events():
    tried, cleaned, events = [], [], []
    result, size = run_with_backoff(
        _fits_up_to(5, tried),
        32,
        local_batch=64,
        step=7,
        cleanup=lambda: cleaned.append(True),
        on_backoff=events.append,
    )
    assert (result, size) == ("ran at 4", 4)
    assert tried == [32, 16, 8, 4]
    assert len(cleaned) == 3
    assert [(e.step, e.failed_micro_batch, e.micro_batch) for e in events] == [
        (7, 32, 16),
        (7, 16, 8),
        (7, 8, 4),
    ]
    assert "Tried to allocate 32" in events[0].reason


def test_backoff_stops_below_one_sample():
    with pytest.raises(DoesNotFitError, match="Step 3.*micro-batch of 1"):
        run_with_backoff(_fits_up_to(0, []), 4, local_batch=8, step=3)


def test_other_errors_propagate_unchanged():
    def attempt(size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        run_with_backoff(attempt, 8, local_batch=8)


def test_another_backends_message_is_not_backed_off_on_the_cpu():
    # A task that trains on the CPU and raises "CUDA error: out of memory" (its own CUDA use, or
    # a message that only reads like one) was backed off down to one sample, then blamed on
    # memory ("not even one sample fits"). A smaller batch cannot cure it: it propagates.
    sizes = []

    def attempt(size):
        sizes.append(size)
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        run_with_backoff(attempt, 8, local_batch=8, device=torch.device("cpu"))
    assert sizes == [8]


def test_disabled_backoff_names_the_smaller_micro_batch():
    with pytest.raises(DoesNotFitError, match="--micro-batch 8") as info:
        run_with_backoff(_fits_up_to(4, []), 16, local_batch=64, enabled=False)
    # nothing about --resume: the loop adds it when a checkpoint holds the progress
    assert "--resume" not in str(info.value)


@pytest.mark.parametrize(
    "micro_batch, local_batch, words",
    [
        (0, 64, "micro_batch"),
        (8.0, 64, "micro_batch"),
        (8, "64", "local_batch"),
        (8, 0, "local_batch"),
    ],
)
def test_bad_sizes_are_refused_before_the_first_attempt(micro_batch, local_batch, words):
    # Before, attempt(0) ran, and a bad local_batch surfaced only at the first out-of-memory.
    tried = []
    with pytest.raises(ConfigError, match=rf"{words} must be a positive whole number of samples"):
        run_with_backoff(_fits_up_to(64, tried), micro_batch, local_batch=local_batch)
    assert tried == []


def test_an_attempt_that_is_not_a_function_or_a_micro_batch_above_the_step_is_refused():
    # Before, run_with_backoff(3, ...) failed with "TypeError: 'int' object is not callable",
    # and a micro-batch above the step's samples reached the attempt.
    with pytest.raises(ConfigError, match="attempt must be a function.*not its result"):
        run_with_backoff(3, 32, local_batch=32)
    tried = []
    with pytest.raises(ConfigError, match=r"micro_batch \(64\) is larger than local_batch \(32\)"):
        run_with_backoff(_fits_up_to(64, tried), 64, local_batch=32)
    assert tried == []
