"""A run that does not learn at all is named, with its cause, even while its rate warms up."""

import json

import numpy as np

from batchfit.cli.main import main
from batchfit.monitor.diagnose import diagnose
from batchfit.monitor.readers import read_history


def _trainer_state(folder, losses, *, rates, grad_norms=None, eval_losses=None):
    """A trainer_state.json shaped as the Hugging Face Trainer writes it."""
    log = []
    for step, (loss, rate) in enumerate(zip(losses, rates), start=1):
        entry = {"epoch": step / 64, "learning_rate": rate, "loss": loss, "step": step}
        if grad_norms is not None:
            entry["grad_norm"] = grad_norms[step - 1]
        log.append(entry)
        if eval_losses is not None and step % 10 == 0:
            log.append({"epoch": step / 64, "eval_loss": eval_losses[step // 10 - 1], "step": step})
    log.append({"epoch": len(losses) / 64, "step": len(losses), "train_loss": losses[0],
                "train_runtime": 1.0})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    state = {"log_history": log, "global_step": len(losses), "train_batch_size": 8}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_a_frozen_loss_during_warmup_is_not_healthy(tmp_path, capsys):
    # A model whose output ignores its weights: log(2) at every step, gradient norm 0, while a
    # 100-step warmup has reached 4e-4 by step 40 (was: healthy, the warmup skipped the checks).
    steps = range(1, 41)
    run = _trainer_state(
        tmp_path, [0.6931471824645996] * 40, rates=[1e-5 * s for s in steps],
        grad_norms=[0.0] * 40, eval_losses=[0.6931471824645996] * 4,
    )  # fmt: skip
    diagnosis = diagnose(read_history(run))
    assert not diagnosis.healthy
    (finding,) = diagnosis.findings
    assert (finding.kind, finding.severity, finding.steps) == ("underfitting", "critical", (1, 40))
    assert "not learning: the training loss is 0.6931 at all 40 logged steps" in finding.summary
    assert "the gradient norm was 0 at every logged step" in finding.summary
    assert "require grad" in finding.advice and "detached" in finding.advice
    assert finding.evidence["grad_norm"] == 0.0 and finding.evidence["lr_peak"] == 0.0004

    assert main(["diagnose", str(run)]) == 0
    assert "not learning" in capsys.readouterr().out


def test_a_zero_rate_is_named_as_the_cause_with_the_setting_to_change(tmp_path):
    # lr=0: the loss moves only with the batches drawn, around its first value.
    noise = np.random.default_rng(0).normal(0, 0.01, 40)
    run = _trainer_state(tmp_path, list(3.9 + noise), rates=[0.0] * 40, grad_norms=[1.2] * 40)
    (finding,) = diagnose(read_history(run)).findings
    assert (finding.kind, finding.severity) == ("underfitting", "critical")
    assert "the learning rate was 0 at every logged step" in finding.summary
    assert "set a positive peak learning rate (learning_rate=...)" in finding.advice
    assert finding.evidence["lr"] == 0.0


def test_a_loss_that_moves_is_not_called_frozen(tmp_path):
    # A run that learns, then flattens at a level: not this finding.
    losses = list(2.3 * np.exp(-0.1 * np.arange(40)) + 0.5)
    run = _trainer_state(tmp_path, losses, rates=[1e-3] * 40, grad_norms=[0.5] * 40)
    assert "not learning" not in " ".join(f.summary for f in diagnose(read_history(run)).findings)
