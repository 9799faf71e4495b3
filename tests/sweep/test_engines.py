"""The engines: worker processes and Ray give the trials the in-process run gives."""

from __future__ import annotations

import pytest

from batchfit.sweep.driver import SweepConfig, run_sweep

DIGITS = "batchfit.examples.digits:task"


def _config(**options):
    base = dict(batch_sizes=(256, 512), seeds=1, widen=0, noise_scale=False)
    return SweepConfig("val_accuracy>=0.9", **(base | options))


def _steps(result):
    return [(t.batch, t.lr, t.seed, t.steps, t.cap_steps) for t in result.trials]


@pytest.mark.integration
def test_two_worker_processes_match_one():
    local = run_sweep(DIGITS, _config(workers=1))
    pooled = run_sweep(DIGITS, _config(workers=2))
    assert _steps(pooled) == _steps(local)


@pytest.mark.integration
def test_ray_with_two_cpus_matches_local():
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    local = run_sweep(DIGITS, _config(workers=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_sweep(DIGITS, _config(ray_address="auto"))
    finally:
        ray.shutdown()
    assert _steps(on_ray) == _steps(local)
    assert on_ray.trials_run == 6


def test_no_ray_cluster_at_the_address_is_one_clear_error(monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    from batchfit.errors import ConfigError

    def no_cluster(**_):
        raise ConnectionError("Could not find any running Ray instance. Please specify one.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError, match=r"No Ray cluster at --ray-address auto .*ray start"):
        run_sweep(DIGITS, _config(ray_address="auto"))
