import pytest
import torch

from batchfit.lr.range_test import lr_range_test
from batchfit.memory.search import find_max_batch_size
from batchfit.noise.measure import measure_noise_scale
from batchfit.throughput.measure import measure_throughput
from tests.conftest import make_mlp_task


def _oom_above_8(batch_size):
    if batch_size > 8:
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")


CALLS = {
    "find_max_batch_size(task)": (
        lambda progress: find_max_batch_size(
            make_mlp_task(samples=64), device="cpu", memory_budget="64MiB", max_batch_size=64,
            progress=progress,
        ),
        {"predict", "trial"},
    ),
    "find_max_batch_size(step)": (
        lambda progress: find_max_batch_size(
            _oom_above_8, device="cpu", memory_budget="1GiB", max_batch_size=64, progress=progress
        ),
        {"trial"},
    ),
    "measure_throughput": (
        lambda progress: measure_throughput(
            make_mlp_task(samples=64), batch_sizes=[4, 8], warmup_steps=0, repeats=1,
            device="cpu", progress=progress,
        ),
        {"measure"},
    ),
    "lr_range_test": (
        lambda progress: lr_range_test(
            make_mlp_task(samples=64), steps=10, smoothing=0.2, device="cpu", progress=progress
        ),
        {"range test"},
    ),
    "measure_noise_scale": (
        lambda progress: measure_noise_scale(
            make_mlp_task(samples=64), batches=2, warmup_steps=2, device="cpu", progress=progress
        ),
        {"warmup", "measure"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_long_running_function_reports_phase_done_total(name):
    call, phases = CALLS[name]
    calls = []
    call(lambda *args: calls.append(args))
    assert calls, "no progress reported"
    assert all(len(args) == 3 for args in calls)
    assert {phase for phase, _, _ in calls} == phases
    for _, done, total in calls:
        assert isinstance(done, int) and done >= 0
        assert total is None or (isinstance(total, int) and done <= total)
