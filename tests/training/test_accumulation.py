import contextlib
import doctest
import gc
import math
import re
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from batchfit.errors import ConfigError, TaskError
from batchfit.training.accumulation import (
    AccumulationPlan,
    accumulate_gradients,
    fitting_micro_batch,
    micro_batch_weights,
    plan_accumulation,
    split_batch,
)
from tests.conftest import classification_loss, make_mlp

# --- the plan ------------------------------------------------------------------------------


def test_even_plan():
    plan = plan_accumulation(64, 16)
    assert plan == AccumulationPlan(64, 16, 1, (16, 16, 16, 16))
    assert plan.accumulation_steps == 4 and plan.rank_batch == 64 and not plan.uneven
    assert plan.describe() == "global batch 64 = 1 rank x 4 micro-batches of 16"
    assert plan.to_dict()["micro_batches"] == [16, 16, 16, 16]
    assert plan.to_dict()["accumulation_steps"] == 4


def test_plan_over_ranks():
    plan = plan_accumulation(256, 32, world_size=2)
    assert plan.micro_batches == (32,) * 4 and plan.rank_batch == 128
    assert plan.describe().startswith("global batch 256 = 2 ranks x 4 micro-batches of 32")
    assert plan_accumulation(32, 32).accumulation_steps == 1


def test_uneven_plan_splits_the_rest_into_a_last_shorter_micro_batch():
    plan = plan_accumulation(58, 16, allow_uneven=True)
    assert plan.micro_batches == (16, 16, 16, 10) and plan.uneven
    assert "16+16+16+10" in plan.describe()
    assert plan_accumulation(116, 16, 2, allow_uneven=True).micro_batches == (16, 16, 16, 10)


def test_uneven_refused_with_the_nearest_divisors_and_global_batches():
    with pytest.raises(ConfigError) as caught:
        plan_accumulation(58, 16)
    message = str(caught.value)
    assert "global_batch (58)" in message and "micro_batch 2 (" in message
    assert "or 29 if memory allows" in message
    assert "48 or 64" in message and "allow_uneven=True" in message
    with pytest.raises(
        ConfigError,
        match="micro_batch 16 .the largest divisor of 64, the samples per rank, below 24",
    ):
        plan_accumulation(128, 24, world_size=2)


def test_a_micro_batch_limit_is_answered_with_the_divisor_below_it_first():
    # 1108 is what fits in memory: 1024 fits wherever it does, 2048 may not
    with pytest.raises(ConfigError, match=r"micro_batch 1024 \(.*\), or 2048 if memory allows"):
        plan_accumulation(4096, 1108)


def test_global_batch_must_split_evenly_over_ranks():
    with pytest.raises(ConfigError, match=r"not a multiple of world_size \(2\).*64 or 66"):
        plan_accumulation(65, 16, world_size=2)


def test_global_smaller_than_micro_times_world():
    with pytest.raises(ConfigError) as caught:
        plan_accumulation(32, 16, world_size=4)
    message = str(caught.value)
    assert "16 x 4 = 64" in message
    assert "lower micro_batch to 8" in message and "raise global_batch to 64" in message


@pytest.mark.parametrize(
    "args", [(0, 16), (64, 0), (-64, 16), (64, -1), (64.0, 16), (64, "16"), (True, 1)]
)
def test_bad_sizes(args):
    with pytest.raises(ConfigError, match="got"):
        plan_accumulation(*args)


@pytest.mark.parametrize("world_size", [0, -2, 1.5, None])
def test_bad_world_size(world_size):
    with pytest.raises(ConfigError, match="world_size"):
        plan_accumulation(64, 16, world_size)


# --- weights -------------------------------------------------------------------------------


def test_weights_are_shares_of_the_total():
    assert micro_batch_weights([16, 16, 16, 10]) == [16 / 58] * 3 + [10 / 58]
    assert micro_batch_weights([30, 10], total=80) == [0.375, 0.125]
    assert sum(micro_batch_weights([3, 0, 5])) == pytest.approx(1.0)


def test_weights_take_tensor_and_numpy_counts():
    import numpy

    counts = [torch.tensor(30), numpy.int64(10)]
    assert micro_batch_weights(counts, total=torch.tensor(80.0)) == [0.375, 0.125]


@pytest.mark.parametrize(
    ("counts", "total"),
    [
        ([], None),
        ([4, -1], None),
        ([0, 0], None),
        ([4], 0),
        (["4"], None),
        ([True], None),
        ([float("nan")], None),
        ([torch.ones(2)], None),
        ([4], float("inf")),
    ],
)
def test_bad_weights(counts, total):
    with pytest.raises(ConfigError):
        micro_batch_weights(counts, total)


# --- gradients -----------------------------------------------------------------------------


def _data(samples: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (samples,), generator=generator)
    return inputs, labels


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [parameter.grad.detach().clone() for parameter in model.parameters()]


def _max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))


def _one_batch_gradient(batch):
    model = make_mlp().double()
    loss = classification_loss(model, batch)
    loss.backward()
    return _grads(model), loss.item()


@pytest.mark.parametrize(
    ("global_batch", "sizes"), [(64, (16, 16, 16, 16)), (58, (16, 16, 16, 10))]
)
def test_accumulated_gradient_equals_the_one_batch_gradient(global_batch, sizes):
    plan = plan_accumulation(global_batch, 16, allow_uneven=True)
    assert plan.micro_batches == sizes
    batch = _data(global_batch)
    want, want_loss = _one_batch_gradient(batch)

    model = make_mlp().double()
    loss = accumulate_gradients(model, classification_loss, split_batch(batch, plan.micro_batches))
    assert _max_relative_error(_grads(model), want) < 1e-6
    assert loss == pytest.approx(want_loss, rel=1e-12)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradients_off_is_named_not_torchs_element_0_error(context):
    # torch said "element 0 of tensors does not require grad and does not have a grad_fn"
    model = make_mlp().double()
    with context(), pytest.raises(ConfigError, match=r"gradients off .*no_grad\(\).*outside"):
        accumulate_gradients(model, classification_loss, split_batch(_data(32), [16, 16]))
    assert all(parameter.grad is None for parameter in model.parameters())


def test_dividing_by_the_number_of_micro_batches_would_be_wrong_for_uneven_splits():
    # The check above can fail: the common 1/k weighting gives a different gradient at 58.
    batch = _data(58)
    want, _ = _one_batch_gradient(batch)
    model = make_mlp().double()
    accumulate_gradients(
        model, classification_loss, split_batch(batch, [16, 16, 16, 10]), counts=[1, 1, 1, 1]
    )
    assert _max_relative_error(_grads(model), want) > 1e-3


def test_gradients_add_to_what_is_already_there():
    batch = _data(32)
    model = make_mlp().double()
    accumulate_gradients(model, classification_loss, split_batch(batch, [16, 16]))
    once = _grads(model)
    accumulate_gradients(model, classification_loss, split_batch(batch, [16, 16]))
    assert all(torch.allclose(twice, 2 * g) for twice, g in zip(_grads(model), once))


PAD = 0


def _token_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 11)).double()


def _token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over the non-padding target tokens of the batch."""
    tokens, targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=PAD)


def _tokens(batch) -> int:
    return int((batch[1] != PAD).sum())


def test_token_mean_loss_with_unequal_tokens_per_micro_batch():
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 11, (12, 9), generator=generator)
    targets = torch.randint(1, 11, (12, 9), generator=generator)
    lengths = torch.tensor([9, 2, 3, 9, 8, 1, 4, 9, 9, 9, 2, 5])  # real tokens per sequence
    targets[torch.arange(9)[None, :] >= lengths[:, None]] = PAD
    batch = (tokens, targets)

    model = _token_model()
    _token_loss(model, batch).backward()
    want = _grads(model)

    parts = split_batch(batch, [4, 4, 4])
    assert [_tokens(part) for part in parts] == [23, 22, 25]
    model = _token_model()
    accumulate_gradients(model, _token_loss, parts, counts=_tokens)
    assert _max_relative_error(_grads(model), want) < 1e-6

    # Weighting by samples instead of tokens gives a different gradient here.
    model = _token_model()
    accumulate_gradients(model, _token_loss, parts)
    assert _max_relative_error(_grads(model), want) > 1e-4


def test_rank_total_under_ddp_gives_the_global_mean():
    # Two ranks' worth of token counts; DDP averages over the 2 ranks.
    counts_rank0, counts_rank1 = [30, 10], [25, 15]
    global_tokens = sum(counts_rank0) + sum(counts_rank1)
    w0 = micro_batch_weights(counts_rank0, total=global_tokens / 2)
    w1 = micro_batch_weights(counts_rank1, total=global_tokens / 2)
    averaged = [w / 2 for w in w0 + w1]
    assert averaged == pytest.approx([c / global_tokens for c in counts_rank0 + counts_rank1])


class _StubDDP(nn.Module):
    """Stands in for DistributedDataParallel: records when no_sync is active."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.syncing = True
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, inputs):
        return self.module(inputs)


def test_no_sync_on_every_micro_batch_but_the_last():
    model = _StubDDP(make_mlp().double())
    seen = []

    def loss_fn(m, batch):
        seen.append(m.syncing)
        return classification_loss(m, batch)

    accumulate_gradients(model, loss_fn, split_batch(_data(58), [16, 16, 16, 10]))
    assert seen == [False, False, False, True]
    assert model.entered == 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_real_ddp_single_process_gloo():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    model = None
    try:
        batch = _data(64)
        want, _ = _one_batch_gradient(batch)
        model = DistributedDataParallel(make_mlp().double())
        seen = []

        def loss_fn(m, micro_batch):
            seen.append(m.require_backward_grad_sync)
            return classification_loss(m, micro_batch)

        accumulate_gradients(model, loss_fn, split_batch(batch, [16, 16, 16, 16]))
        assert seen == [False, False, False, True]
        assert _max_relative_error(_grads(model.module), want) < 1e-6
    finally:
        # DDP's reducer holds the process group: free it first, or destroying the group and
        # then the reducer can leave gloo's destructor waiting on its worker thread forever.
        del model
        gc.collect()
        dist.destroy_process_group()


def test_loss_must_be_a_scalar():
    model = make_mlp().double()

    def per_sample(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    with pytest.raises(TaskError, match=r"scalar tensor.*\(16,\).*mean"):
        accumulate_gradients(model, per_sample, split_batch(_data(32), [16, 16]))


def test_counts_must_match_the_micro_batches():
    with pytest.raises(ConfigError, match="counts has 1 entries for 2 micro-batches"):
        accumulate_gradients(
            make_mlp().double(), classification_loss, split_batch(_data(32), [16, 16]), counts=[1]
        )
    with pytest.raises(ConfigError, match="empty"):
        accumulate_gradients(make_mlp(), classification_loss, [])


def test_arguments_of_the_wrong_kind_are_named():
    # A plan raised "'AccumulationPlan' object is not iterable"; a tensor was taken row by row
    # as micro-batches; a loss in the model's place failed inside the forward.
    model, data = make_mlp().double(), _data(32)
    for wrong, name in ((plan_accumulation(32, 16), "AccumulationPlan"), (data[0], "Tensor"),
                        ({"x": data[0]}, "dict"), (7, "int")):  # fmt: skip
        with pytest.raises(
            ConfigError, match=rf"micro_batches must be a list.*got {name}; .*split"
        ):
            accumulate_gradients(model, classification_loss, wrong)
    with pytest.raises(ConfigError, match=r"model must be a torch.nn.Module, got function"):
        accumulate_gradients(classification_loss, model, split_batch(data, [16, 16]))


# --- splitting -----------------------------------------------------------------------------

Pair = namedtuple("Pair", "inputs labels")


def test_split_nested_batches_keeps_their_structure():
    batch = {
        "pair": Pair(torch.arange(6), torch.arange(6) * 10),
        "mask": [torch.ones(6, 2)],
        "name": "shapes",
    }
    parts = split_batch(batch, [4, 2])
    assert len(parts) == 2
    assert isinstance(parts[1]["pair"], Pair)
    assert parts[1]["pair"].labels.tolist() == [40, 50]
    assert parts[0]["mask"][0].shape == (4, 2)
    assert parts[0]["name"] == parts[1]["name"] == "shapes"
    assert split_batch(torch.arange(3), [1, 2])[1].tolist() == [1, 2]


def test_split_sizes_must_add_up():
    with pytest.raises(ConfigError, match=r"add up to 30, but the batch holds 32"):
        split_batch(_data(32), [16, 14])
    with pytest.raises(ConfigError, match="at least 1"):
        split_batch(_data(32), [32, 0])


def test_split_refuses_a_tensor_whose_first_dimension_differs():
    # It was repeated whole in every micro-batch: 5 labels beside 3 and 3 inputs, no error.
    with pytest.raises(ConfigError, match=r"batch\[1\] has 5 rows but the batch holds 6"):
        split_batch((torch.randn(6, 2), torch.randn(5)), [3, 3])
    batch = {"x": torch.randn(6, 2), "pair": Pair(torch.arange(6), torch.arange(4))}
    with pytest.raises(ConfigError, match=r"batch\['pair'\]\.labels has 4 rows.*0-dim"):
        split_batch(batch, [4, 2])
    parts = split_batch((torch.randn(6, 2), torch.tensor(0.5)), [4, 2])  # 0-dim: repeated
    assert [part[1].item() for part in parts] == [0.5, 0.5]


def test_split_sizes_must_be_a_list():
    with pytest.raises(ConfigError, match=r"sizes must be a list of micro-batch sizes, got 3"):
        split_batch(_data(6), 3)


def test_micro_batches_without_tokens_are_skipped():
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 11, (8, 5), generator=generator)
    targets = torch.randint(1, 11, (8, 5), generator=generator)
    targets[4:6] = PAD  # the second micro-batch has no target tokens: its mean loss is NaN
    batch = (tokens, targets)
    model = _token_model()
    _token_loss(model, batch).backward()
    want = _grads(model)

    model = _token_model()
    loss = accumulate_gradients(model, _token_loss, split_batch(batch, [4, 2, 2]), counts=_tokens)
    assert math.isfinite(loss)
    assert _max_relative_error(_grads(model), want) < 1e-6


def test_docstring_examples_run():
    import batchfit.training.accumulation

    assert doctest.testmod(batchfit.training.accumulation).failed == 0


@pytest.mark.slow
def test_readme_loop_trains_digits(tmp_path):
    """The README's hand-written loop runs as printed and learns the digits."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Accumulation and learning-rate scaling", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "loop.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=300
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "global batch 256 = 1 rank x 8 micro-batches of 32"
    assert float(lines[-1].split()[-1]) >= 0.9


def test_custom_backward_such_as_a_grad_scaler():
    batch = _data(32)
    want, _ = _one_batch_gradient(batch)
    calls = []

    def scaled_backward(loss):  # what scaler.scale(loss).backward() does, with scale 8
        calls.append(loss.item())
        (loss * 8).backward()

    model = make_mlp().double()
    accumulate_gradients(
        model, classification_loss, split_batch(batch, [16, 16]), backward=scaled_backward
    )
    assert len(calls) == 2
    assert _max_relative_error([g / 8 for g in _grads(model)], want) < 1e-6


@pytest.mark.parametrize(
    "global_batch, micro_batch, world_size, expected",
    [(4096, 1108, 1, 1024), (192, 64, 2, 48), (512, 88, 1, 64), (256, 256, 2, 128), (7, 4, 1, 1),
     (96, 1, 1, 1), (64, 64, 1, 64)],
)  # fmt: skip
def test_fitting_micro_batch_is_the_largest_divisor_of_the_share_within_the_limit(
    global_batch, micro_batch, world_size, expected
):
    # The greatest common divisor before: 4 for 4096 at 1108, 1024 micro-batches per step.
    result = fitting_micro_batch(global_batch, micro_batch, world_size)
    assert result == expected
    plan_accumulation(global_batch, result, world_size)  # an even split


@pytest.mark.parametrize(
    "first", [torch.tensor(0.5), "digits", None, 3], ids=["0-dim", "str", "None", "int"]
)
def test_split_batch_repeats_a_constant_that_comes_before_the_tensors(first):
    # The docstring promised it; the batch's size was read from the first value: a 0-dim
    # tensor raised IndexError, a string RecursionError, None or 3 TypeError.
    inputs = torch.arange(6)
    for batch in ((first, inputs), {"meta": first, "inputs": inputs}):
        parts = split_batch(batch, [4, 2])
        values = [list(part.values()) if isinstance(part, dict) else part for part in parts]
        assert [value[1].tolist() for value in values] == [[0, 1, 2, 3], [4, 5]]
        assert all(value[0] is first for value in values)
    with pytest.raises(TaskError, match="no tensor with a first dimension"):
        split_batch(("digits", torch.tensor(0.5)), [1])


def test_sizes_or_a_whole_loader_batch_in_place_of_micro_batches_are_named():
    # Sizes failed with "The batch holds no tensor with a first dimension"; a DataLoader's
    # [inputs, targets] ran the loss on the inputs alone and failed inside cross_entropy.
    model, (inputs, labels) = make_mlp().double(), _data(32)
    with pytest.raises(ConfigError, match=r"holds sizes \[16, 16\], not micro-batches.*split"):
        accumulate_gradients(model, classification_loss, plan_accumulation(32, 16).micro_batches)
    with pytest.raises(ConfigError, match=r"looks like one batch.*split_batch\(batch"):
        accumulate_gradients(model, classification_loss, [inputs, labels])
    assert accumulate_gradients(model, classification_loss, [(inputs, labels)]) > 0


def test_a_short_last_loader_batch_is_named_with_how_to_cut_it():
    # Before, only "give sizes that sum to the batch size (e.g. plan.micro_batches)": the plan's
    # sizes were what the loop gave, for a DataLoader's last batch of 20.
    with pytest.raises(ConfigError, match=r"holds 20 samples.*drop_last=True.*plan_accumulation"):
        split_batch(_data(20), plan_accumulation(32, 16).micro_batches)
    parts = split_batch(_data(20), plan_accumulation(20, 16, allow_uneven=True).micro_batches)
    assert [len(part[0]) for part in parts] == [16, 4]
