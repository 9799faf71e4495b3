"""default_batch_sizes."""

from batchfit.throughput.sizes import default_batch_sizes


def test_default_batch_sizes():
    assert default_batch_sizes(1) == [1]
    assert default_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_batch_sizes(100)[-2:] == [64, 100]
