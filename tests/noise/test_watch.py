"""Tests of batchfit.noise.watch: micro-batch and DDP-rank gradient norms for the tracker."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch

from batchfit.errors import ConfigError
from batchfit.noise.estimator import NoiseScaleTracker
from batchfit.noise.measure import measure_noise_scale
from batchfit.noise.run_advice import noise_scale_advice, noise_scale_loggable
from batchfit.noise.watch import GradientNormWatch
from tests.conftest import make_mlp_task


def _accumulate_with_watch(task, model, watch, order, sizes, *, loss_multiplier=1.0):
    total = sum(sizes)
    start = 0
    for size in sizes:
        batch = task.batch(order[start : start + size])
        start += size
        (task.loss(model, batch) * (size / total) * loss_multiplier).backward()
        watch.micro_batch(size)


def test_in_training_estimate_agrees_with_the_standalone_one():
    # The same model and the same big batches (measure_noise_scale draws them with a generator
    # seeded task.seed + 1): the hook-based norms inside accumulation give the same estimate
    # as the standalone measurement's explicit per-micro-batch gradients.
    task = make_mlp_task()
    small, big, batches = 8, 64, 20
    standalone = measure_noise_scale(
        task, small_batch=small, big_batch=big, batches=batches, warmup_steps=0, device="cpu"
    )
    model = task.make_model()
    tracker = NoiseScaleTracker(dataset_size=len(task.train_data), window=None)
    generator = torch.Generator().manual_seed(task.seed + 1)
    with GradientNormWatch(model, tracker) as watch:
        for _ in range(batches):
            order = torch.randperm(len(task.train_data), generator=generator)[:big].tolist()
            model.zero_grad(set_to_none=True)
            _accumulate_with_watch(task, model, watch, order, [small] * (big // small))
            watch.step()
    in_training = tracker.estimate()
    assert in_training.batches == batches
    assert in_training.noise_scale_samples == pytest.approx(
        standalone.noise_scale_samples, rel=1e-4
    )
    assert in_training.gradient_sq_norm == pytest.approx(standalone.gradient_sq_norm, rel=1e-4)
    assert (in_training.low_samples, in_training.high_samples) == pytest.approx(
        (standalone.low_samples, standalone.high_samples), rel=1e-3
    )


def test_uneven_micro_batches_use_the_harmonic_mean_and_grad_scale_cancels():
    task = make_mlp_task()
    order = list(range(40))
    plain, scaled = NoiseScaleTracker(window=None), NoiseScaleTracker(window=None)
    for tracker, multiplier in ((plain, 1.0), (scaled, 1024.0)):
        model = task.make_model()
        with GradientNormWatch(model, tracker) as watch:
            _accumulate_with_watch(
                task, model, watch, order, [16, 16, 8], loss_multiplier=multiplier
            )
            watch.step(grad_scale=multiplier)
    assert plain.small_batch == pytest.approx(3 / (1 / 16 + 1 / 16 + 1 / 8))
    assert plain.big_batch == 40
    assert scaled.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-5)
    assert scaled.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-5)


def test_hooks_match_explicit_gradient_norms():
    task = make_mlp_task()
    model = task.make_model()
    tracker = NoiseScaleTracker(window=None)
    batches = [task.batch(range(0, 8)), task.batch(range(8, 16))]
    expected_small = []
    reference = task.make_model()
    for batch in batches:
        grads = torch.autograd.grad(task.loss(reference, batch), list(reference.parameters()))
        expected_small.append(sum(float(g.square().sum()) for g in grads))
    with GradientNormWatch(model, tracker) as watch:
        for batch in batches:
            (task.loss(model, batch) * 0.5).backward()
            watch.micro_batch(8)
        expected_big = sum(float(p.grad.square().sum()) for p in model.parameters())
        watch.step()
    gradient_sq, trace = tracker.gradient_sq_norm, tracker.trace_covariance
    small_sq = sum(expected_small) / 2
    assert trace == pytest.approx((small_sq - expected_big) / (1 / 8 - 1 / 16), rel=1e-5)
    assert gradient_sq == pytest.approx((16 * expected_big - 8 * small_sq) / 8, rel=1e-5)


def test_one_micro_batch_on_one_rank_is_skipped():
    task = make_mlp_task()
    model = task.make_model()
    tracker = NoiseScaleTracker()
    watch = GradientNormWatch(model, tracker)
    task.loss(model, task.batch(range(16))).backward()
    watch.micro_batch(16)
    watch.step()
    assert tracker.updates == 0
    watch.remove()
    task.loss(model, task.batch(range(16))).backward()  # no hooks left: nothing recorded
    with pytest.raises(ConfigError, match="no micro_batch"):
        watch.step()


def test_misuse_names_the_fix():
    task = make_mlp_task()
    model = task.make_model()
    with GradientNormWatch(model, NoiseScaleTracker()) as watch:
        with pytest.raises(ConfigError, match="no backward ran"):
            watch.micro_batch(8)
        task.loss(model, task.batch(range(8))).backward()
        with pytest.raises(ConfigError, match="after each micro-batch"):
            watch.step()
        with pytest.raises(ConfigError, match="positive"):
            watch.micro_batch(0)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        GradientNormWatch(torch.nn.ReLU(), NoiseScaleTracker())


def test_a_watch_without_a_tracker_is_refused_when_made():
    # Accepted before, to fail at the first step() with AttributeError on None.
    with pytest.raises(ConfigError, match="tracker must be a NoiseScaleTracker, got NoneType"):
        GradientNormWatch(torch.nn.Linear(2, 1), None)


# --- across DDP ranks ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, result_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        task = make_mlp_task()
        model = DistributedDataParallel(task.make_model())
        tracker = NoiseScaleTracker(dataset_size=len(task.train_data), window=None)
        generator = torch.Generator().manual_seed(5)
        with GradientNormWatch(model, tracker) as watch:
            assert watch.distributed
            for _ in range(4):
                order = torch.randperm(len(task.train_data), generator=generator)[:32].tolist()
                mine = order[rank * 16 : (rank + 1) * 16]  # each rank one half, one micro-batch
                model.zero_grad(set_to_none=True)
                task.loss(model, task.batch(mine)).backward()
                watch.micro_batch(16)
                watch.step()
        if rank == 0:
            torch.save(tracker.state_dict(), result_file)
        # both ranks leave together: rank 0 hosts the store, and a rank still tearing down
        # gloo when it is gone can abort ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_ddp_ranks_give_the_same_estimate_as_one_process(tmp_path):
    # Two gloo ranks, one micro-batch of 16 each: the local gradients are the small batches and
    # the all-reduced one the big batch, the same as one process accumulating two micro-batches.
    import torch.multiprocessing as mp

    result_file = str(tmp_path / "rank0.pt")
    # spawn, not fork: a child forked after the parent's OpenMP thread pool has started (any
    # earlier test in the session) can deadlock inside the pool.
    for attempt in range(2):  # a second try on a fresh port, should another process take it
        context = mp.start_processes(
            _ddp_worker,
            args=(2, _free_port(), result_file),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 90  # a hung rank fails the test instead of blocking it
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail("the two DDP ranks did not finish within 90 s")
            break
        except mp.ProcessRaisedException as error:
            if attempt == 1 or "address" not in str(error).lower():
                raise
        except mp.ProcessExitedException:  # a rank killed by a signal (gloo's teardown)
            if attempt == 1:
                raise
    distributed = NoiseScaleTracker(dataset_size=256, window=None)
    distributed.load_state_dict(torch.load(result_file, weights_only=False))

    task = make_mlp_task()
    model = task.make_model()
    single = NoiseScaleTracker(dataset_size=len(task.train_data), window=None)
    generator = torch.Generator().manual_seed(5)
    with GradientNormWatch(model, single) as watch:
        for _ in range(4):
            order = torch.randperm(len(task.train_data), generator=generator)[:32].tolist()
            model.zero_grad(set_to_none=True)
            _accumulate_with_watch(task, model, watch, order, [16, 16])
            watch.step()
    assert distributed.updates == 4 and distributed.big_batch == 32
    assert distributed.small_batch == 16
    assert distributed.gradient_sq_norm == pytest.approx(single.gradient_sq_norm, rel=1e-4)
    assert distributed.trace_covariance == pytest.approx(single.trace_covariance, rel=1e-4)


# --- sizes given to step(), and the training-loop callback --------------------------------


def test_sizes_given_to_step_match_micro_batch_calls_and_drop_a_failed_attempt():
    from batchfit.training.accumulation import accumulate_gradients, split_batch

    task = make_mlp_task()
    batch = task.batch(range(48))
    with_calls, with_sizes = NoiseScaleTracker(window=None), NoiseScaleTracker(window=None)
    model = task.make_model()
    with GradientNormWatch(model, with_calls) as watch:
        _accumulate_with_watch(task, model, watch, list(range(48)), [16, 16, 16])
        watch.step()
    model = task.make_model()
    with GradientNormWatch(model, with_sizes) as watch:
        # an attempt that failed after one backward (as after out-of-memory), then redone
        task.loss(model, task.batch(range(8))).backward()
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, task.loss, split_batch(batch, [16, 16, 16]))
        watch.step([16, 16, 16], step=7)
    assert with_sizes.step == 7
    assert with_sizes.gradient_sq_norm == pytest.approx(with_calls.gradient_sq_norm, rel=1e-6)
    assert with_sizes.trace_covariance == pytest.approx(with_calls.trace_covariance, rel=1e-6)


class _Segments(torch.nn.Module):
    """Three layers; `checkpointed` names those run under reentrant activation checkpointing."""

    def __init__(self, checkpointed: tuple[int, ...] = ()):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))
        self.checkpointed = checkpointed

    def forward(self, inputs):
        from torch.utils.checkpoint import checkpoint

        for index, layer in enumerate(self.layers):
            if index in self.checkpointed:
                inputs = checkpoint(layer, inputs, use_reentrant=True)
            else:
                inputs = layer(inputs)
            inputs = torch.tanh(inputs)
        return inputs


@pytest.mark.parametrize("checkpointed", [(1,), (0, 1, 2)], ids=["middle", "every-layer"])
@pytest.mark.parametrize("by_sizes", [False, True], ids=["micro_batch", "step-sizes"])
def test_reentrant_checkpointing_measures_as_without_it(checkpointed, by_sizes):
    # Each checkpointed segment's backward is a backward of its own (a graph task): the watch
    # took each as a micro-batch, and with the sizes given to step() kept the last ones: |G|^2
    # and tr(Sigma) of a model half checkpointed came out of a third of its parameters.
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(24, 6, generator=generator, requires_grad=True)
    targets = torch.randn(24, 6, generator=generator)
    trackers = []
    for layers in ((), checkpointed):
        model, tracker = _Segments(layers), NoiseScaleTracker(window=None)
        with GradientNormWatch(model, tracker) as watch:
            for part in range(3):
                rows = slice(8 * part, 8 * part + 8)
                loss = (model(inputs[rows]) - targets[rows]).square().mean() / 3
                loss.backward()
                if not by_sizes:
                    watch.micro_batch(8)
            watch.step([8, 8, 8] if by_sizes else None)
        trackers.append(tracker)
    plain, checkpointing = trackers
    assert checkpointing.updates == plain.updates == 1
    assert checkpointing.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-6)
    assert checkpointing.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-6)


def test_given_big_norm_is_used_instead_of_grad():
    task = make_mlp_task()
    model = task.make_model()
    tracker = NoiseScaleTracker(window=None)
    with GradientNormWatch(model, tracker) as watch:
        for part in (range(0, 8), range(8, 16)):
            (task.loss(model, task.batch(part)) * 0.5).backward()
        big_sq = sum(float(p.grad.square().sum()) for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # changes .grad, not the norm
        watch.step([8, 8], big_sq_norm=big_sq)
    reference = NoiseScaleTracker(window=None)
    model = task.make_model()
    with GradientNormWatch(model, reference) as watch:
        for part in (range(0, 8), range(8, 16)):
            (task.loss(model, task.batch(part)) * 0.5).backward()
        watch.step([8, 8])
    assert tracker.gradient_sq_norm == pytest.approx(reference.gradient_sq_norm, rel=1e-5)


def test_sizes_that_do_not_match_the_backward_passes_are_refused():
    task = make_mlp_task()
    model = task.make_model()
    with GradientNormWatch(model, NoiseScaleTracker()) as watch:
        task.loss(model, task.batch(range(8))).backward()
        with pytest.raises(ConfigError, match="2 micro-batch sizes were given but 1 backward"):
            watch.step([4, 4])
        task.loss(model, task.batch(range(8))).backward()
        with pytest.raises(ConfigError, match="loss_scales has 1 entries"):
            watch.step([4, 4], loss_scales=[0.5])
        watch.reset()
        task.loss(model, task.batch(range(8))).backward()
        task.loss(model, task.batch(range(8))).backward()
        with pytest.raises(ConfigError, match="call backward\\(\\) once per micro-batch"):
            watch.micro_batch(8)
        watch.reset()
        task.loss(model, task.batch(range(8))).backward()
        watch.micro_batch(8)
        with pytest.raises(ConfigError, match="not both"):
            watch.step([8])


@pytest.mark.parametrize(
    "estimate, words",
    [
        (None, "not yet reliable"),
        (600.0, "well above the global batch"),
        (10.0, "well below the global batch"),
        (70.0, "close to the global batch"),
    ],
)
def test_noise_advice_compares_with_the_global_batch(estimate, words):
    assert words in noise_scale_advice(estimate, 64)


def test_noise_advice_offers_a_larger_batch_only_within_a_quarter_of_the_data():
    # 2 x 64 = 128 per step leaves 4 steps per epoch of 512 samples, 3.9 of 511
    assert "would now save steps" in noise_scale_advice(600.0, 64, dataset_size=512)
    tight = noise_scale_advice(600.0, 64, dataset_size=511)
    assert "save steps" not in tight and "near a quarter of the 511 training samples" in tight


def test_noise_advice_follows_the_runs_diagnosis():
    # a run that overfits is advised a smaller batch: the line offers no larger one
    overfit = noise_scale_advice(1077.0, 64, overfits=True)
    assert "save steps" not in overfit and "but the run overfits" in overfit
    assert "part of each batch" in noise_scale_advice(10.0, 64, overfits=True)
    held = noise_scale_advice(44.0, 256, held="the run is diverging")
    assert held == (
        "noise scale at the end: ~44 samples, not read against the global batch: the run is "
        "diverging"
    )


@pytest.mark.parametrize(
    "global_batch, micro_batch, world_size, dataset_size, loggable, words",
    [
        (64, 32, 1, 1000, True, "2 micro-batches per step"),
        (32, 32, 1, 1000, True, "one micro-batch per step: consecutive steps are paired"),
        (64, 32, 2, 1000, True, "2 micro-batches per step over 2 ranks"),
        (2000, 500, 1, 1000, False, "larger than the training set (1000 samples)"),
    ],
)
def test_noise_scale_loggable_and_why(
    global_batch, micro_batch, world_size, dataset_size, loggable, words
):
    ok, reason = noise_scale_loggable(
        global_batch, micro_batch, dataset_size=dataset_size, world_size=world_size
    )
    assert ok is loggable and words in reason


def test_a_watch_of_something_that_is_not_a_module_is_refused():
    # An optimizer was taken, to fail with AttributeError: no attribute 'parameters'.
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module, got SGD"):
        GradientNormWatch(optimizer, NoiseScaleTracker())
