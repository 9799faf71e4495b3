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


def test_batch_advice_without_the_batch_still_follows_the_logged_rate_and_rule(tmp_path):
    # A Lightning CSVLogger log has no global batch, but LearningRateMonitor's `lr-SGD` tells
    # the rate (0.5) and the rule (linear): the advice names the new rate, by that rule alone
    from batchfit.monitor.diagnose import diagnose
    from batchfit.monitor.readers import read_history

    swings = [1.0, 0.2, 1.6, 0.1, 1.9, 0.3, 1.2, 0.05]
    rows = ["step,train_loss,lr-SGD"] + [
        f"{s},{3 * 0.99**s * swings[s // 5 % len(swings)]},0.5" for s in range(0, 200, 5)
    ]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (finding,) = [f for f in diagnose(read_history(tmp_path)).findings if f.kind == "noisy"]
    assert finding.advice == (
        "raise the global batch 4x by accumulating 4 micro-batches, and the learning rate 4x "
        "(0.5 -> 2) by the linear rule"
    )
    assert finding.settings == {"global_batch_factor": 4, "lr_factor": 4, "lr": 2.0}
    # Adam's tag: the square-root rule; a log that does not say: both, each with its rate
    text, settings = change_batch(RunSettings(lr=0.001, rule="sqrt"), 4)
    assert text.endswith("the learning rate 2x (0.001 -> 0.002) by the sqrt rule")
    text, settings = change_batch(RunSettings(lr=0.001), 0.5)
    assert text == (
        "lower the global batch 0.5x, and the learning rate 0.5x (0.001 -> 0.0005) by the "
        "linear rule (0.707x by the square-root rule for Adam: 0.000707)"
    )
    assert settings["lr_sqrt"] == 0.001 * 0.5**0.5
