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


TASK_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchfit.task import Task


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _loss(model, batch):
    inputs, labels = batch
    return nn.functional.cross_entropy(model(inputs), labels)


def task():
    inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    return Task(model=_model, train_data=TensorDataset(inputs, labels), loss=_loss,
                optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr), lr=0.1,
                batch_size=32, name="file-task")
"""


def _file_task(tmp_path):
    from batchfit.task import load_task

    path = tmp_path / "my_task.py"
    path.write_text(TASK_FILE)
    return load_task(f"{path}:task")


def test_the_code_of_a_task_file_loaded_by_path_is_shipped_by_value(tmp_path):
    from batchfit.sweep.engines import _unimportable_modules
    from tests.conftest import make_mlp_task

    loaded = _file_task(tmp_path)
    modules = _unimportable_modules(loaded)
    assert [module.__file__ for module in modules] == [str(tmp_path / "my_task.py")]
    assert _unimportable_modules(make_mlp_task()) == []  # tests.conftest imports by name


@pytest.mark.integration
def test_ray_runs_a_task_object_loaded_from_a_file(tmp_path):
    # Ray pickled the Task's functions by reference to the file's made-up module name, which
    # no worker can import: every trial failed with ModuleNotFoundError.
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    task = _file_task(tmp_path)
    config = SweepConfig("train_loss<=0.9", batch_sizes=(32, 64), seeds=1, widen=0,
                         noise_scale=False)  # fmt: skip
    local = run_sweep(task, SweepConfig(**{**config.to_dict(), "workers": 1}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_sweep(task, SweepConfig(**{**config.to_dict(), "ray_address": "auto"}))
    finally:
        ray.shutdown()
    assert _steps(on_ray) == _steps(local) and on_ray.trials_run == 6
    assert not ray.cloudpickle.list_registry_pickle_by_value()  # nothing left registered


@pytest.mark.integration
def test_worker_processes_take_a_task_object_with_lambdas():
    # The Task was pickled with each trial even under fork: its lambda optimizer failed with
    # "Can't pickle local object".
    from tests.conftest import make_mlp_task

    config = dict(batch_sizes=(32, 64), seeds=1, widen=0, noise_scale=False)
    local = run_sweep(make_mlp_task(), SweepConfig("val_accuracy>=0.6", workers=1, **config))
    pooled = run_sweep(make_mlp_task(), SweepConfig("val_accuracy>=0.6", workers=2, **config))
    assert _steps(pooled) == _steps(local) and pooled.trials_run == 6


@pytest.mark.integration
def test_a_ray_the_sweep_started_is_shut_down_and_one_it_found_is_left_running():
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    result = run_sweep(DIGITS, _config(ray_address="local"))
    assert result.trials_run == 6
    assert not ray.is_initialized()  # the sweep's own Ray: shut down, not left holding cores
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(DIGITS, _config(ray_address="auto"))
        assert ray.is_initialized()  # the caller's Ray: left as it was
    finally:
        ray.shutdown()


FAILING_LOSS = """

def _loss(model, batch):
    inputs, labels = batch
    if len(labels) == 64 and model.training:
        raise ValueError("this loss cannot take batch 64")
    return nn.functional.cross_entropy(model(inputs), labels)
"""


def _failing_task_file(tmp_path):
    # The file's own _loss, replaced by one that fails at batch 64 (the model's training mode
    # tells a training step from train_loss's evaluation).
    path = tmp_path / "failing_task.py"
    source = TASK_FILE.replace("\ndef task():", FAILING_LOSS + "\n\ndef task():")
    path.write_text(source)
    return str(path)


@pytest.mark.integration
@pytest.mark.parametrize("engine", [["--workers", "1"], ["--workers", "2"]])
def test_a_trial_failing_in_the_task_code_is_one_line_naming_the_trial(engine, tmp_path, capsys):
    # In a worker process the error came back without the task file's frames: the CLI printed
    # the whole traceback instead of the one line it gives in-process.
    from batchfit.cli.main import main

    argv = ["sweep", f"{_failing_task_file(tmp_path)}:task", "--target", "train_loss<=0.9"]
    argv += ["--batch-sizes", "32,64", "--seeds", "1", "--widen", "0", "--no-noise-scale"]
    assert main([*argv, *engine, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchfit: error: The trial at batch 64")
    assert "failing_task.py raised ValueError at line" in err and "cannot take batch 64" in err


@pytest.mark.integration
def test_a_trial_failing_on_ray_raises_the_one_line_error(tmp_path):
    # Ray's RayTaskError reads as the worker's whole traceback; the TaskError is raised as itself.
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    from batchfit.errors import TaskError

    config = SweepConfig("train_loss<=0.9", batch_sizes=(32, 64), seeds=1, widen=0,
                         noise_scale=False, ray_address="auto")  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(TaskError) as caught:
            run_sweep(f"{_failing_task_file(tmp_path)}:task", config)
    finally:
        ray.shutdown()
    assert type(caught.value) is TaskError and "Traceback" not in str(caught.value)
    assert str(caught.value).startswith("The trial at batch 64, lr ")


def test_an_address_where_nothing_listens_is_refused_before_ray_waits(monkeypatch):
    # ray.init retried such an address for about 14 minutes before raising, deaf to Ctrl-C.
    import socket

    ray = pytest.importorskip("ray", reason="Ray is optional: pip install batchfit[ray]")
    from batchfit.errors import ConfigError

    def hangs(**_):
        raise AssertionError("ray.init was called for an address where nothing listens")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", hangs)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"No Ray cluster at --ray-address 127.0.0.1:{port} "):
        run_sweep(DIGITS, _config(ray_address=f"127.0.0.1:{port}"))


SLOW_LOSS = """

def _loss(model, batch):
    import os, time

    inputs, labels = batch
    loss = nn.functional.cross_entropy(model(inputs), labels)
    steps = os.environ.get("SWEEP_TEST_STEPS")
    if steps and len(labels) == 64 and model.training:
        # training at batch 64 learns nothing and is slow: the trial runs to its cap, 16 s
        with open(steps, "a") as log:
            log.write("step\\n")
        time.sleep(0.2)
        return loss * 0
    return loss
"""


@pytest.mark.integration
def test_ctrl_c_stops_the_sweep_with_one_line_not_one_per_worker(tmp_path):
    # Ctrl-C reaches every process of the terminal's group: a training worker printed "signal 2:
    # stopping after this step", an idle one a KeyboardInterrupt traceback ("Process
    # SpawnProcess-1: ..."), before the sweep killed them.
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "slow_task.py"
    path.write_text(TASK_FILE.replace("\ndef task():", SLOW_LOSS + "\n\ndef task():"))
    steps = tmp_path / "steps-at-64"
    command = [sys.executable, "-m", "batchfit", "sweep", f"{path}:task", "--target",
               "train_loss<=0.9", "--batch-sizes", "32,64", "--seeds", "1", "--widen", "0",
               "--workers", "2", "--no-noise-scale", "--out", str(tmp_path / "sweep")]  # fmt: skip
    environment = {**os.environ, "SWEEP_TEST_STEPS": str(steps), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        command, env=environment, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not steps.exists() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.05)
        assert steps.exists(), "no trial at batch 64 started"
        time.sleep(0.5)  # the trial at 64 trains; the other worker waits for work
        os.killpg(sweep.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, stderr = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130
    # neither a training worker's stop line nor an idle worker's KeyboardInterrupt traceback
    assert "stopping after this step" not in stderr and "Process SpawnProcess" not in stderr
    assert stderr.count("interrupted") == 1


@pytest.mark.integration
def test_sigterm_to_the_sweep_ends_its_worker_processes_and_keeps_finished_trials(
    tmp_path, monkeypatch
):
    # SIGTERM to the main process alone (kill PID, timeout) waited for the running trials to
    # finish, minutes perhaps, then threw their results away.
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from batchfit.interrupts import signals_as_interrupt

    path = tmp_path / "slow_task.py"
    path.write_text(TASK_FILE.replace("\ndef task():", SLOW_LOSS + "\n\ndef task():"))
    steps = tmp_path / "steps-at-64"
    monkeypatch.setenv("SWEEP_TEST_STEPS", str(steps))  # spawned workers inherit it
    config = SweepConfig("train_loss<=0.9", batch_sizes=(32, 64), seeds=1, widen=0,
                         workers=2, noise_scale=False)  # fmt: skip
    folder = tmp_path / "sweep"

    def terminate_once_one_trial_is_kept_and_one_runs() -> None:
        while not (list(folder.glob("trials/b32_*.json")) and steps.exists()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    others = set(multiprocessing.active_children())
    threading.Thread(target=terminate_once_one_trial_is_kept_and_one_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt("SIGTERM"):
        run_sweep(f"{path}:task", config, out_dir=folder)
    cap = 20 * 256 // 64  # --max-epochs 20 of 256 samples at batch 64
    assert len(steps.read_text().splitlines()) < cap  # stopped, not waited for
    deadline = time.monotonic() + 5  # the workers are gone (reaped within moments)
    while not set(multiprocessing.active_children()) <= others and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(multiprocessing.active_children()) <= others
    kept = [p.name for p in folder.glob("trials/*.json")]
    assert len(kept) == 1 and kept[0].startswith("b32_")
    monkeypatch.delenv("SWEEP_TEST_STEPS")
    in_process = SweepConfig(**{**config.to_dict(), "workers": 1})
    resumed = run_sweep(f"{path}:task", in_process, out_dir=folder)
    assert (resumed.trials_run, resumed.trials_resumed) == (5, 1)
