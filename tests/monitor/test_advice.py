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
