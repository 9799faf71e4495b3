"""The run that does not learn at all: a loss that never moves from its first value.

Separate from `batchfit.monitor.checks.underfitting` (a loss that improves by less than its
noise): here the evidence is certain and says why, so it is judged from the first points and
even while the rate warms up. Three signs, each naming its cause: the logged rate is 0 at every
step; the logged gradient norm is 0 at every step; the loss is the same at every logged step
(`FLAT_RELATIVE`), which no step that changed the model's output would leave.
"""

from __future__ import annotations

from batchfit.monitor import findings as limits
from batchfit.monitor.advice import RunSettings, range_test_words, setting_words
from batchfit.monitor.curve import rounded
from batchfit.monitor.findings import Finding
from batchfit.monitor.history import History, Series
from batchfit.units import format_count

__all__ = ["not_learning"]

_GRADIENT_CAUSES = (
    "check that the parameters require grad and are in the optimizer, that the loss is not "
    "detached from the model (.item(), .detach(), torch.no_grad()) and depends on its output "
    "(a zeroed or constant output layer gives every weight a zero gradient)"
)


def _all_zero(series: Series | None) -> bool:
    """Whether the series was logged (two or more finite values) and is 0 at every step."""
    values = series.finite().values if series is not None else ()
    return len(values) >= 2 and all(value == 0 for value in values)


def not_learning(history: History, run: RunSettings) -> list[Finding]:
    """A critical `underfitting` finding when no step of the run could change the model: the
    logged rate or gradient norm is 0 at every step, or the training loss is the same at every
    one of `MIN_POINTS` or more logged steps; empty otherwise.

    Example:
        >>> h = History.from_records(
        ...     [{"step": s, "loss": 0.6931, "lr": 0.0} for s in range(1, 11)])
        >>> not_learning(h, RunSettings(lr=0.0))[0].summary
        'not learning: the training loss is 0.6931 at all 10 logged steps (1-10), and the learning rate was 0 at every logged step'
    """  # noqa: E501
    train = history.train_loss.finite()
    values = train.values
    if len(values) < limits.MIN_POINTS:
        return []
    first = values[0]
    change = max(abs(value - first) for value in values)
    flat = first != 0 and change <= limits.FLAT_RELATIVE * abs(first)
    zero_rate, zero_gradient = _all_zero(history.lr), _all_zero(history.grad_norm)
    if not (flat or zero_rate or zero_gradient):
        return []
    steps = (int(train.steps[0]), int(train.steps[-1]))
    evidence: dict[str, object] = {
        "first_loss": rounded(first),
        "last_loss": rounded(values[-1]),
        "largest_change": rounded(change, 3),
        "points": len(values),
    }
    logged = f"{format_count(len(values), 'logged step')} ({steps[0]}-{steps[1]})"
    if flat:
        seen = f"not learning: the training loss is {rounded(first)} at all {logged}"
    else:
        seen = (
            f"not learning: the training loss went from {rounded(first)} to "
            f"{rounded(values[-1])} over {logged}"
        )
    rate = history.lr.finite().values if history.lr is not None else ()
    settings: dict[str, object] = {}
    if zero_rate:
        evidence["lr"] = 0.0
        seen += ", and the learning rate was 0 at every logged step"
        advice = (
            "the optimizer never moved the weights: set a positive peak learning rate"
            f"{setting_words(run, 'lr', '...')}; {range_test_words(run)} finds one"
        )
        settings["run"] = "batchfit lr-range"
    else:
        if zero_gradient:
            evidence["grad_norm"] = 0.0
            seen += ", and the gradient norm was 0 at every logged step"
        if rate:
            evidence["lr_peak"] = rounded(max(rate), 3)
            seen += f", while the learning rate reached {rounded(max(rate), 3)}"
        advice = f"no step changed the model's output: {_GRADIENT_CAUSES}"
        if not zero_gradient and rate:
            advice += (
                f"; if they do, the rate ({rounded(max(rate), 3)} at most) is far too small "
                f"to move the loss: run {range_test_words(run)}"
            )
    return [Finding("underfitting", "critical", seen, evidence, advice, steps, settings)]
