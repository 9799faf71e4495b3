"""Tests for batchfit.noise.result: the words, table rows and dict of a noise-scale estimate."""

from batchfit.noise.result import NoiseScaleResult, RunningEstimate


def _result(**overrides) -> NoiseScaleResult:
    fields = dict(
        noise_scale_samples=600.0,
        low_samples=400.0,
        high_samples=900.0,
        confidence=0.9,
        batches=50,
        gradient_sq_norm=0.5,
        trace_covariance=300.0,
        small_batch_samples=16.0,
        big_batch_samples=256.0,
        dataset_size=1000,
        finite_population_corrected=True,
        window_steps=None,
        reliable=True,
        reason="",
        step=50,
        samples_seen=3200,
        running=(RunningEstimate(10, 550.0, 300.0, None),),
    )
    fields.update(overrides)
    return NoiseScaleResult(**fields)


def test_describe_gives_the_value_interval_and_point():
    text = _result().describe()
    assert text.startswith("Critical batch size about 600 samples (90% interval 400 to 900;")
    assert "50 batches at step 50, 3,200 samples seen" in text
    assert "interval is wide" not in text


def test_a_wide_interval_gets_advice_and_an_unreliable_one_its_reason():
    assert "interval is wide: measure more batches" in _result(high_samples=None).describe()
    unreliable = _result(noise_scale_samples=None, reliable=False, reason="too few batches")
    assert unreliable.describe() == "Not yet reliable: too few batches"
    assert dict(unreliable.summary_rows())["noise scale B_simple"] == "not yet reliable"


def test_a_wide_interval_asks_only_for_a_big_batch_the_training_set_holds():
    # An estimate of 4,447 from big batches of 256 out of 600 samples: a big batch "nearer
    # the estimate" (4,447) is refused as larger than the training set; the whole set is not.
    wide = dict(noise_scale_samples=4447.0, low_samples=2387.0, high_samples=19575.0)
    text = _result(**wide, dataset_size=600).describe()
    assert "the whole training set as the big batch (now 256 of the 600 training samples)" in text
    assert "nearer the estimate" not in text
    text = _result(**wide, dataset_size=100_000).describe()
    assert "a big batch nearer the estimate (now 256 of the 100,000 training samples)" in text
    assert "big batch" not in _result(**wide, big_batch_samples=600.0, dataset_size=600).describe()
    assert "nearer the estimate (now 256)" in _result(**wide, dataset_size=None).describe()


def test_to_dict_and_rows():
    data = _result().to_dict()
    assert data["running"] == [
        {"batches": 10, "noise_scale_samples": 550.0, "low_samples": 300.0, "high_samples": None}
    ]
    assert data["meaning"] == _result().describe()
    rows = dict(_result().summary_rows())
    assert rows["90% interval"] == "400 to 900"
    assert rows["finite population"] == "corrected for N = 1000 samples"
    assert rows["B_small / B_big"] == "16 / 256"
    # micro-batches of 48 and 16 in a big batch of 64: the estimator's B_small is 24
    uneven = dict(_result(small_batch_samples=24.0, big_batch_samples=64.0).summary_rows())
    assert uneven["B_small / B_big"].startswith("24 / 64 (uneven micro-batches")
