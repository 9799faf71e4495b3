"""The diagnosis's batch advice under data parallelism: the micro-batch is per rank."""

from batchfit.monitor.advice import RunSettings, change_batch


def test_batch_advice_for_a_run_on_several_ranks_counts_per_rank():
    # 2 ranks, global 64 = 2 x 2 x 16: 4x is 8 micro-batches of 16 on each rank, not 16
    text, settings = change_batch(RunSettings(64, 16, 0.001, "linear", 200, world_size=2), 4)
    assert text.startswith(
        "accumulate 8 micro-batches of 16 on each of 2 ranks: global batch 64 -> 256"
    )
    assert settings["micro_batch"] * settings["accumulation_steps"] * 2 == 256
    # a plan's 128 = 64 x 1 x 2 halved: 32 per rank, a setting train --nproc 2 accepts
    text, settings = change_batch(RunSettings(128, 64, 0.004, "sqrt", 30, world_size=2), 0.5)
    assert text.startswith("one micro-batch of 32 on each of 2 ranks: global batch 128 -> 64")
    assert (settings["micro_batch"], settings["accumulation_steps"], settings["world_size"]) == (
        32,
        1,
        2,
    )


def test_a_count_of_one_is_singular():
    # "warm up 1 steps"
    from batchfit.monitor.advice import lower_rate

    assert "warm up 1 step," in lower_rate(RunSettings(lr=0.1, total_steps=10))[0]
    text, _ = change_batch(RunSettings(16, 16, 0.001, "linear", 20), 4)
    assert text.endswith("warm up 1 step (5 steps for the same samples)")
