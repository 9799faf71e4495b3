import pytest

from batchfit.errors import ConfigError
from batchfit.training.sampling import (
    epoch_permutation,
    global_batch_indices,
    rank_slice,
    steps_for_epochs,
)


def test_steps_cover_each_epoch_once_in_seeded_order():
    steps = [global_batch_indices(s, dataset_size=10, global_batch=5, seed=3) for s in range(4)]
    assert steps[0] + steps[1] == epoch_permutation(0, dataset_size=10, seed=3)
    assert steps[2] + steps[3] == epoch_permutation(1, dataset_size=10, seed=3)
    assert sorted(steps[0] + steps[1]) == list(range(10))


def test_a_batch_straddling_two_epochs_takes_the_end_of_one_and_start_of_the_next():
    first, second = (epoch_permutation(e, dataset_size=5, seed=0) for e in (0, 1))
    assert global_batch_indices(1, dataset_size=5, global_batch=3, seed=0) == first[3:] + second[:1]


def test_global_batch_larger_than_the_data_reads_several_epochs():
    indices = global_batch_indices(0, dataset_size=4, global_batch=10, seed=0)
    assert len(indices) == 10 and sorted(indices[:4]) == [0, 1, 2, 3]


def test_the_order_depends_on_the_seed_and_is_repeatable():
    one = global_batch_indices(0, dataset_size=100, global_batch=10, seed=1)
    assert one == global_batch_indices(0, dataset_size=100, global_batch=10, seed=1)
    assert one != global_batch_indices(0, dataset_size=100, global_batch=10, seed=2)


def test_rank_slices_partition_the_global_batch():
    indices = list(range(8))
    parts = [rank_slice(indices, rank=r, world_size=4) for r in range(4)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="multiple of 3"):
        rank_slice(indices, rank=0, world_size=3)


def test_steps_for_epochs_rounds_up():
    assert steps_for_epochs(1, dataset_size=10, global_batch=4) == 3
    assert steps_for_epochs(0.1, dataset_size=10, global_batch=4) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ConfigError, match="global_batch"):
        global_batch_indices(0, dataset_size=10, global_batch=bad, seed=0)


def test_the_kept_permutation_is_not_changed_by_what_callers_do_with_their_indices():
    from batchfit.training.sampling import epoch_permutation, stream_indices

    first = stream_indices(0, 6, dataset_size=10, seed=3)
    whole = epoch_permutation(0, dataset_size=10, seed=3)
    first.clear(), whole.reverse()
    assert (
        stream_indices(0, 6, dataset_size=10, seed=3)
        == epoch_permutation(0, dataset_size=10, seed=3)[:6]
    )
    # a step that straddles two epochs, then the first epoch again: each drawn from its seed
    straddling = stream_indices(8, 4, dataset_size=10, seed=3)
    assert straddling[:2] == epoch_permutation(0, dataset_size=10, seed=3)[8:]
    assert straddling[2:] == epoch_permutation(1, dataset_size=10, seed=3)[:2]
