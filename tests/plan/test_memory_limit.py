import torch

from batchfit.plan.memory_limit import memory_limit
from tests.conftest import make_mlp_task


def test_a_limit_at_the_training_set_is_said_in_the_plans_words():
    limit, memory = memory_limit(
        make_mlp_task(samples=64), torch.device("cpu"), "1GiB", 0.05, 64, lambda *_: None
    )
    assert limit == 64
    # `batchfit plan` has no --max-batch: the search's own note named it
    assert not any("--max-batch" in note for note in memory["notes"])
    assert any("Every batch up to the 64 training samples fits" in n for n in memory["notes"])
