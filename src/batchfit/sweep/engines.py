"""Where trials run: local worker processes, or Ray tasks on a cluster.

Both engines take the task as a spec string ("package.module:function" or
"path/to/file.py:function", loaded once per worker) or as a `Task` object. Local workers are
processes, each training single-threaded (`torch.set_num_threads(1)`), so N workers use N cores
without fighting over them; a spec string starts them with "spawn", a Task object is handed over
once by "fork" (POSIX only; never pickled, so lambdas in it are fine). Ray runs each trial as a
task with one CPU (Ray pickles a Task object with cloudpickle, the code of a task file loaded by
path by value). `ray_session` connects once for a whole sweep and shuts down a Ray it started.
Results come back as trials finish; which trials run is decided by the driver between waves, so
the results do not depend on the engine or on the number of workers. A sweep stopped while
trials run in local workers (SIGTERM or Ctrl-C to the sweep's process, a failed trial) ends them
rather than waiting for their trials, whose results it could no longer use.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from batchfit.errors import BatchfitError, ConfigError, MissingDependencyError, TaskError
from batchfit.sweep.target import Target
from batchfit.sweep.trial import TrialResult, TrialSpec, run_trial

if TYPE_CHECKING:
    from batchfit.task import Task

__all__ = ["check_ray_address", "default_workers", "ray_session", "run_trials"]

_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9._-]+:(\d{1,5})$")


def default_workers() -> int:
    """The cores this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_ray_address(address: str) -> str:
    """Return `address` when it is "auto", "local", "HOST:PORT" or "ray://HOST:PORT".

    Raises:
        ConfigError: anything else, with examples.

    Example:
        >>> check_ray_address("10.0.0.5:6379")
        '10.0.0.5:6379'
    """
    if address in ("auto", "local"):
        return address
    match = _ADDRESS.match(address or "")
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(
            f"Ray address {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT; e.g. "
            "--ray-address auto (a cluster started with `ray start`) or 10.0.0.5:6379."
        )
    return address


@functools.lru_cache(maxsize=1)
def _load_source(source: str) -> Task:
    # Each worker process loads the task once, not once per trial.
    from batchfit.task import load_task

    return load_task(source)


_FORKED: list[Task] = []
"""In a forked worker process only: the Task it inherited from `_start_worker`."""


def _start_worker(task: Task | None = None) -> None:
    """The pool's initializer. Ctrl-C reaches every process of the terminal's group: the sweep
    stops (and kills) its workers itself, so they ignore it (each printed its own "stopping
    after this step"). Under "fork" the arguments are inherited, never pickled, so a Task
    holding lambdas or local functions (which pickle cannot send) reaches the worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if task is not None:
        _FORKED[:] = [task]


def _resolve(source: str | Task | None) -> Task:
    if source is None:
        return _FORKED[0]
    return _load_source(source) if isinstance(source, str) else source


def _run_one(task: Task, spec: TrialSpec, target: Target, device, tolerance: float) -> TrialResult:
    """`run_trial`, with an exception raised in the task's own code (its model, loss or batch
    function) turned into a one-line `TaskError` naming the trial, in the process that ran it:
    a worker process's or a Ray task's traceback does not survive the trip back, so the CLI
    could not find the task's file and line in it (and printed the whole traceback)."""
    from batchfit.task import task_code_error

    try:
        return run_trial(task, spec, target, device=device, tolerance=tolerance)
    except Exception as error:
        line = task_code_error(error)
        if line is None:
            raise
        raise TaskError(
            f"The trial at batch {spec.batch}, lr {spec.lr:.3g}, seed {spec.seed} failed: {line}"
        ) from error


def _trial_in_worker(
    source: str | Task | None, spec: TrialSpec, target: Target, tolerance: float
) -> TrialResult:
    import torch

    torch.set_num_threads(1)
    return _run_one(_resolve(source), spec, target, "cpu", tolerance)


def run_trials(
    source: str | Task,
    specs: Sequence[TrialSpec],
    target: Target,
    *,
    tolerance: float,
    workers: int = 1,
    ray_address: str | None = None,
    device: str = "cpu",
) -> Iterator[TrialResult]:
    """Run trials and yield each result as it finishes.

    Args:
        source: the task, as a spec string or a `Task`.
        specs: the trials.
        target: what each trial trains to.
        tolerance: see `batchfit.sweep.trial.run_trial`.
        workers: local processes; 1 runs the trials in this process, on `device`.
        ray_address: run on Ray instead ("auto", "local", "HOST:PORT"); an already started
            Ray (`ray.init` in this process) is used as it is.
        device: where in-process trials train; worker processes and Ray tasks train on CPU.

    Raises:
        MissingDependencyError: Ray asked for but not installed.
    """
    if not specs:
        return
    if ray_address is not None:
        yield from _run_on_ray(source, specs, target, tolerance, ray_address)
    elif workers <= 1 or len(specs) == 1:
        task = _resolve(source)
        for spec in specs:
            yield _run_one(task, spec, target, device, tolerance)
    else:
        yield from _run_in_processes(source, specs, target, tolerance, workers)


def _run_in_processes(source, specs, target, tolerance, workers) -> Iterator[TrialResult]:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    options: dict[str, Any] = {"max_workers": min(workers, len(specs))}
    options["initializer"] = _start_worker
    if isinstance(source, str):
        options["mp_context"] = multiprocessing.get_context("spawn")
    else:
        # Each call's arguments are pickled even under fork: hand the Task over once, by fork.
        options["mp_context"] = multiprocessing.get_context("fork")
        options["initargs"] = (source,)
        source = None
    others = set(multiprocessing.active_children())
    with ProcessPoolExecutor(**options) as pool:
        pending = {pool.submit(_trial_in_worker, source, spec, target, tolerance) for spec in specs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BaseException:
            # Stopped (SIGTERM or Ctrl-C to this process, a failed trial, the caller gone): the
            # pool's exit would wait for the running trials, minutes perhaps, and their results
            # would be lost anyway. The workers write no files (this process saves each trial as
            # it comes), so they are killed (SIGTERM would let each finish its training step and
            # log the stop on stderr): every child started since the pool was made.
            pool.shutdown(wait=False, cancel_futures=True)
            _kill_children_since(others)
            raise


def _kill_children_since(others: set, rounds: int = 5) -> None:
    """Kill and reap every child process not in `others`, reading them again until none is
    left (at most `rounds` times, 0.1 s apart)."""
    import time

    for _ in range(rounds):
        started = set(multiprocessing.active_children()) - others
        if not started:
            return
        for process in started:
            process.kill()
        for process in started:
            process.join()
        time.sleep(0.1)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to Ray at `address` for the block, and disconnect at its end (also on an error
    or Ctrl-C) when this block connected; a Ray already started in this process is used and
    left running. None: nothing to do.

    Raises:
        MissingDependencyError: Ray is not installed.
        ConfigError: no Ray cluster answers at `address`.
    """
    if address is None:
        yield
        return
    ray = _import_ray()
    started = not ray.is_initialized()
    _connect(ray, address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "Optional dependency 'ray' is needed for --ray-address: pip install batchfit[ray]."
        ) from None
    return ray


GCS_PROBE_SECONDS = 10.0
"""How long `_connect` waits for a HOST:PORT to accept a connection before calling it absent."""


def _connect(ray: Any, address: str) -> None:
    check_ray_address(address)
    if not ray.is_initialized():
        refused = _unreachable(address)
        if refused is not None:
            # ray.init retries an address where nothing listens for about 14 minutes (20
            # tries of ~40 s), deaf to Ctrl-C, before it raises: ask the port first.
            raise _no_cluster(address, refused)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else "no answer"
            raise _no_cluster(address, first) from None


def _no_cluster(address: str, why: str) -> ConfigError:
    return ConfigError(
        f"No Ray cluster at --ray-address {address} ({why}); start one with `ray start --head`, "
        "or give --ray-address local to start one for this sweep."
    )


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a HOST:PORT address (e.g. "connection refused"), or None when a
    TCP connection opens there, or for auto, local and ray:// addresses (Ray gives up on those
    within half a minute itself)."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=GCS_PROBE_SECONDS):
            return None
    except OSError as error:
        return (error.strerror or str(error) or type(error).__name__).lower()


def _run_on_ray(source, specs, target, tolerance, address) -> Iterator[TrialResult]:
    ray = _import_ray()
    _connect(ray, address)
    remote = ray.remote(num_cpus=1)(_trial_in_worker)
    shipped = _unimportable_modules(source) if not isinstance(source, str) else []
    pending: list[Any] = []
    try:
        for module in shipped:
            ray.cloudpickle.register_pickle_by_value(module)
        # Ray pickles the arguments here, at submission.
        pending = [remote.remote(source, spec, target, tolerance) for spec in specs]
    finally:
        for module in shipped:
            ray.cloudpickle.unregister_pickle_by_value(module)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    # Ray's error reads as the worker's whole traceback: batchfit's own error
                    # (one line) is raised as itself, anything else keeps Ray's report.
                    if isinstance(error.cause, BatchfitError):
                        raise error.cause from error
                    raise
                yield result
    finally:
        for ref in pending:
            ray.cancel(ref)


def _unimportable_modules(task: Task) -> list[ModuleType]:
    """The modules of the task's functions, classes and objects that a Ray worker could not
    import by name: a task file loaded by path (`load_task("path/to/file.py:task")`) is in
    `sys.modules` under a made-up name, so its functions are shipped by value instead."""
    from dataclasses import fields
    from importlib.machinery import PathFinder

    found: dict[str, ModuleType] = {}
    for field in fields(task):
        name = getattr(getattr(task, field.name), "__module__", None)
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or name == "__main__" or name in sys.builtin_module_names:
            continue  # cloudpickle ships __main__'s code by value itself
        if PathFinder.find_spec(name.partition(".")[0]) is None:
            found[name] = module
    return list(found.values())
