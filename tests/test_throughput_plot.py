import pytest

from batchfit.errors import ConfigError
from batchfit.throughput import ThroughputResult
from batchfit.throughput_plot import plot_throughput


def _result(tokens):
    sizes = (1, 2, 4, 8)
    seconds = (0.01, 0.011, 0.012, 0.02)
    return ThroughputResult(
        batch_sizes=sizes,
        seconds_per_step=seconds,
        samples_per_second=tuple(b / s for b, s in zip(sizes, seconds)),
        tokens_per_second=tuple(64 * b / s for b, s in zip(sizes, seconds)) if tokens else None,
        step_seconds=tuple((s * 0.9, s, s * 1.2) for s in seconds),
        knee_batch=4,
        best_batch=8,
        fraction=0.9,
        limit_batch=8,
        limit_reason="out_of_memory",
        stopped_early=False,
        warmup_steps=2,
        repeats=3,
        device="cpu",
    )


@pytest.mark.parametrize("tokens", [False, True])
def test_writes_a_png(tmp_path, tokens):
    path = plot_throughput(_result(tokens), tmp_path / "t.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and list(tmp_path.iterdir()) == [path]


def test_rejects_other_suffixes(tmp_path):
    with pytest.raises(ConfigError, match="must end in .png"):
        plot_throughput(_result(False), tmp_path / "t.svg")
