"""ThroughputMeter."""

import pytest

from batchfit.throughput.meter import ThroughputMeter


def test_meter_window_and_state():
    meter = ThroughputMeter(window=3)
    assert meter.samples_per_second is None
    for now, samples in ((0.0, 10), (1.0, 10), (2.0, 20), (3.0, 30), (4.0, 40)):
        meter.step(samples, tokens=samples * 2, now=now)
    # the last three steps: 20 + 30 + 40 samples from t=1 to t=4
    assert meter.samples_per_second == pytest.approx(30.0)
    assert meter.tokens_per_second == pytest.approx(60.0)
    other = ThroughputMeter()
    other.load_state_dict(meter.state_dict())
    assert other.samples_per_second == meter.samples_per_second and other.window == 3
    meter.reset()
    assert meter.samples_per_second is None
    meter.step(8, now=0.0), meter.step(8, now=0.5)
    assert meter.samples_per_second == 16.0 and meter.tokens_per_second is None


def test_a_loaded_meter_does_not_count_the_time_between_saving_and_loading():
    # Before, a run resumed 997 s after its checkpoint read 0.03 samples/s, not 10, for the next
    # steps (the restart counted as training time); a clock from another machine gave None.
    meter = ThroughputMeter(window=3)
    for now in (0.0, 1.0, 2.0, 3.0):
        meter.step(10, now=now)
    for later in (1000.0, -5e6):
        resumed = ThroughputMeter(window=3, clock=lambda later=later: later)
        resumed.load_state_dict(meter.state_dict())
        assert resumed.samples_per_second == pytest.approx(10.0)
        resumed.step(10, now=later + 1.0)
        assert resumed.samples_per_second == pytest.approx(10.0)


def test_counts_are_checked_and_an_integer_tensor_is_taken_as_its_value():
    # A negative or fractional count was kept and gave a negative or fractional rate; a
    # tensor token count made the rate a tensor and the state hold tensors.
    import torch

    from batchfit.errors import ConfigError

    meter = ThroughputMeter()
    for bad in (-5, 2.5, True, None):
        with pytest.raises(ConfigError, match="samples must be a whole number of at least 0"):
            meter.step(bad, now=0.0)
    with pytest.raises(ConfigError, match="tokens must be a whole number of at least 0"):
        meter.step(8, tokens=-1, now=0.0)
    meter.step(8, tokens=torch.tensor(100), now=0.0)
    meter.step(8, tokens=torch.tensor(100), now=1.0)
    assert meter.tokens_per_second == 100.0 and type(meter.tokens_per_second) is float
