"""The diverging checks on curves of real shapes: a loss that rose above its first value at the
start and fell back, and one that never fell back."""

import numpy as np

from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.history import History

# A 2-layer GPT-2 (vocabulary 32) under the Trainer with Adam at rate 0.1, logged every step:
# the loss climbs from ln(32) to 4.65 in three steps, then falls back and creeps down.
RATE_0_1_START = [3.27, 3.58, 3.84, 4.65, 4.46, 4.65, 4.43, 4.28, 3.84, 3.57, 3.35, 3.5, 3.31]
# The same model at rate 0.3, logged every 3 steps: the first logged loss (a mean over steps
# 1-3) already holds part of the blow-up.
RATE_0_3_START = [6.46, 9.89, 9.5, 8.74, 8.36, 7.86, 6.06, 5.23, 4.62, 4.37, 4.08, 3.87, 3.86]


def _run(start, n, end, *, lr, every=1, seed=0):
    wiggle = 0.03 * np.random.default_rng(seed).standard_normal(n - len(start))
    tail = np.linspace(start[-1], end, n - len(start)) + wiggle
    losses = [*start, *tail]
    records = [
        {"step": every * (i + 1), "loss": float(v), "lr": lr * (1 - i / n)}
        for i, v in enumerate(losses)
    ]
    return History.from_records(records, format="transformers")


def test_a_rise_above_the_first_loss_that_the_run_survived_is_a_diverging_warning():
    diagnosis = diagnose(_run(RATE_0_1_START, 200, 2.77, lr=0.1))
    # was: healthy (below the 3x of a blow-up, and no progress yet for a rise from the best)
    finding = diagnosis.get("diverging")
    assert finding is not None and finding.severity == "warning"
    assert "rose above its first value 3.27, to 4.65 (1.42x) at step 4" in finding.summary
    assert "fell back to" in finding.summary
    assert "(0.1 -> 0.01)" in finding.advice and "max_grad_norm=1" in finding.advice


def test_an_averaged_first_log_still_shows_the_rise_and_no_higher_rate_is_advised():
    diagnosis = diagnose(_run(RATE_0_3_START, 66, 3.26, lr=0.297, every=3))
    # was: only 'stalled' (info), advising to raise the rate 2x (0.297 -> 0.594)
    assert diagnosis.kinds() == ["diverging"]
    finding = diagnosis.get("diverging")
    assert "to 9.89 (1.53x) at step 6" in finding.summary
    assert "0.297 -> 0.0297" in finding.advice


def test_a_rise_that_does_not_fall_back_is_critical():
    losses = [2.3, 2.4, 2.9, 3.1, 3.2, 3.3, 3.3, 3.4, 3.35, 3.4, 3.45, 3.4, 3.5, 3.45, 3.5, 3.5]
    history = History.from_records([{"step": i + 1, "loss": v} for i, v in enumerate(losses)])
    finding = diagnose(history).get("diverging")
    assert finding.severity == "critical"
    assert "and ends at 3.5, 1.52x its start" in finding.summary


def test_a_first_loss_within_the_noise_of_the_next_is_no_rise():
    # step-to-step noise of +-0.4 around 2.3 at the start: a first loss of 1.9 is one draw
    generator = np.random.default_rng(5)
    start = [1.9, 2.6, 2.2, 2.7, 1.8, 2.5, 2.4]
    tail = list(np.linspace(2.2, 0.5, 93) * (1 + 0.15 * generator.standard_normal(93)))
    history = History.from_records([{"step": i + 1, "loss": v} for i, v in enumerate(start + tail)])
    assert diagnose(history).get("diverging") is None


def test_a_blow_up_to_billions_reads_in_powers_of_ten():
    losses = [1.294, 1.2, 1.1, 5e3, 3.161e9, 2e9, 3e9, 2.5e9, 2.9e9, 3e9]
    history = History.from_records([{"step": i + 1, "loss": v} for i, v in enumerate(losses)])
    summary = diagnose(history).get("diverging").summary
    # was: "the loss rose to 3161000000.0, 2443000000.0x its first value 1.294"
    assert summary.startswith("the loss rose to 3.161e+09, 2.44e+09x its first value 1.294")
