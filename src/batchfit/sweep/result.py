"""What a sweep found: steps to target per batch, the fitted critical batch, the best rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchfit.sweep.fit import StepsFit
from batchfit.sweep.trial import TrialResult

__all__ = ["BatchPoint", "SweepResult", "rate_edge"]


def rate_edge(best_lr: float | None, rates: Sequence[float]) -> str | None:
    """ "highest" or "lowest" when `best_lr` is at that edge of the `rates` tried (two or more),
    else None: a best rate at the edge may have a better one beyond it.

    Example:
        >>> rate_edge(0.01, [0.001, 0.003, 0.01]), rate_edge(0.003, [0.001, 0.003, 0.01])
        ('highest', None)
    """
    if best_lr is None or len(rates) < 2:
        return None
    if best_lr == max(rates):
        return "highest"
    if best_lr == min(rates):
        return "lowest"
    return None


@dataclass(frozen=True)
class BatchPoint:
    """One batch size of a sweep.

    Attributes:
        batch: global batch in samples.
        steps: S(B), the seed-mean steps to target at the best rate; None when no rate
            reached the target with every seed.
        steps_low, steps_high: the fewest and most steps over seeds at that rate.
        best_lr: the rate with the fewest mean steps (None when none reached the target).
        scaled_lr: the rule-scaled rate the grid was centred on (what the plan would use).
        rates: every rate tried, ascending.
        trials: trials run at this batch.
    """

    batch: int
    steps: float | None
    steps_low: int | None
    steps_high: int | None
    best_lr: float | None
    scaled_lr: float
    rates: tuple[float, ...]
    trials: int

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__} | {
            "rates": list(self.rates)
        }


@dataclass(frozen=True)
class SweepResult:
    """The outcome of `batchfit.sweep.driver.run_sweep`.

    Attributes:
        task: the task's name.
        target: the target, as text ("val_accuracy>=0.96").
        seeds: the seeds every (batch, rate) ran with.
        points: one `BatchPoint` per batch, ascending.
        fit: S = S_min + E_min / B over the points (None with fewer than two).
        fit_reason: why there is no fit or no B_crit, else empty.
        critical_batch_low, critical_batch_high: the range of B_crit over per-seed fits
            (each seed's steps at each batch's best rate); high None when a seed showed no plateau
            (B_crit above the grid), low 0 when a seed's steps did not fall with the batch.
        lr_exponent: slope of log(best rate) against log(batch).
        lr_rule: the scaling rule the grids were centred with.
        noise_scale: `NoiseScaleResult.to_dict()` of `measure_noise_scale` on the same task, or
            None when skipped.
        trials: every trial, including those read back from the folder.
        trials_run: trials trained in this call; trials_resumed: read back instead.
        samples: samples trained on by all trials (resumed included).
        seconds: wall time of this call.
        folder: the sweep folder, or None.
    """

    task: str
    target: str
    seeds: tuple[int, ...]
    points: tuple[BatchPoint, ...]
    fit: StepsFit | None
    fit_reason: str
    critical_batch_low: float | None
    critical_batch_high: float | None
    lr_exponent: float | None
    lr_rule: str
    noise_scale: dict[str, Any] | None
    trials: tuple[TrialResult, ...] = field(repr=False)
    trials_run: int
    trials_resumed: int
    samples: int
    seconds: float
    folder: str | None

    @property
    def critical_batch(self) -> float | None:
        """B_crit = E_min / S_min in samples, or None (see `fit_reason`)."""
        return self.fit.critical_batch if self.fit is not None else None

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["seeds"] = list(self.seeds)
        data["points"] = [point.to_dict() for point in self.points]
        data["fit"] = self.fit.to_dict() if self.fit is not None else None
        data["trials"] = [trial.to_dict() for trial in self.trials]
        data["critical_batch"] = self.critical_batch
        data["meaning"] = self.describe()
        return data

    def table_rows(self) -> list[tuple[str, ...]]:
        """One row per batch: batch, steps (range), best rate, rule-scaled rate, fitted steps."""
        rows = [("batch", "steps to target (seeds)", "best lr", "rule lr", "fit")]
        for point in self.points:
            steps = "not reached"
            if point.steps is not None:
                steps = f"{point.steps:.1f} ({point.steps_low}-{point.steps_high})"
            rows.append(
                (
                    str(point.batch),
                    steps,
                    f"{point.best_lr:.3g}" if point.best_lr is not None else "-",
                    f"{point.scaled_lr:.3g}",
                    f"{self.fit.steps_at(point.batch):.1f}" if self.fit is not None else "-",
                )
            )
        return rows

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows of the read-out."""
        rows = [("target", self.target), ("seeds", str(len(self.seeds)))]
        if self.fit is not None:
            rows += [
                ("S_min (steps)", f"{self.fit.min_steps:.1f}"),
                ("E_min (samples)", f"{self.fit.min_samples:,.0f}"),
            ]
        crit = self.critical_batch
        rows.append(("B_crit = E_min/S_min", f"{crit:,.0f}" if crit is not None else "-"))
        if crit is not None:
            # One seed's fit is the fit itself: "152 to 152" would read as a measured spread.
            spread = self._seed_range() if len(self.seeds) > 1 else "- (one seed: use --seeds 2+)"
            rows.append(("B_crit over seeds", spread))
        if self.noise_scale is not None:
            noise = self.noise_scale
            value = noise.get("noise_scale_samples")
            low, high = noise.get("low_samples"), noise.get("high_samples")
            text = "-" if value is None else f"{value:,.0f}"
            if value is not None and low is not None:
                text += f" ({low:,.0f} to {'?' if high is None else f'{high:,.0f}'})"
            rows.append(("noise scale B_simple", text))
        exponent = self.lr_exponent
        rows.append(("best-rate exponent", f"{exponent:.2f}" if exponent is not None else "-"))
        rows.append(("lr rule (plan)", self.lr_rule))
        rows.append(("trials run / resumed", f"{self.trials_run} / {self.trials_resumed}"))
        rows.append(("samples trained", f"{self.samples:,}"))
        rows.append(("time", f"{self.seconds:.1f} s"))
        return rows

    def _seed_range(self) -> str:
        """ "98 to 278"; an end beyond the grid is named ("below the grid", "unbounded")."""
        low, high = self.critical_batch_low, self.critical_batch_high
        if low is None:  # no seed's own fit has B_crit inside or below the grid
            return "above the grid"
        if high == 0:
            return "below the grid"
        start = "below the grid" if low == 0 else f"{low:,.0f}"
        return f"{start} to {'unbounded' if high is None else f'{high:,.0f}'}"

    def edge_rates(self) -> list[tuple[int, str]]:
        """(batch, "highest" or "lowest") where the best rate is at the edge of the rates tried:
        the true best may lie beyond, so that batch's steps are an upper bound."""
        edges = [(point.batch, rate_edge(point.best_lr, point.rates)) for point in self.points]
        return [(batch, edge) for batch, edge in edges if edge is not None]

    def missed(self) -> list[tuple[int, int | None]]:
        """(batch, the largest step cap of its trials, None when unknown) for each batch at which
        no rate reached the target with every seed: those batches are left out of the fit."""
        caps: dict[int, int] = {}
        for trial in self.trials:
            caps[trial.batch] = max(caps.get(trial.batch, 0), trial.cap_steps)
        return [(p.batch, caps.get(p.batch)) for p in self.points if p.steps is None]

    def diverged_everywhere(self) -> list[tuple[int, float]]:
        """(batch, its lowest rate tried) for each batch that missed the target where the loss
        diverged at every rate tried (with some seed): its rates were all too high, so more
        steps or an easier target would not help; lower rates would."""
        diverged: dict[int, set[float]] = {}
        for trial in self.trials:
            if trial.diverged:
                diverged.setdefault(trial.batch, set()).add(trial.lr)
        return [
            (point.batch, min(point.rates))
            for point in self.points
            if point.steps is None
            and point.rates
            and set(point.rates) <= diverged.get(point.batch, set())
        ]

    def _missed_text(self) -> str:
        missed = self.missed()
        if not missed:
            return ""
        shown = ", ".join(
            f"{batch}" + (f" (within {cap} steps)" if cap is not None else "")
            for batch, cap in missed
        )
        text = (
            f" At batch {shown} no rate reached {self.target} with every seed, so the fit leaves "
            "it out"
        )
        too_high = self.diverged_everywhere()
        if too_high:
            lowest = ", ".join(f"{lr:.3g} at batch {batch}" for batch, lr in too_high)
            text += (
                f"; the loss diverged at every rate tried at batch "
                f"{', '.join(str(batch) for batch, _ in too_high)} (down to {lowest}): the rates "
                "are too high there, so raise --widen to try lower ones (each 1 more adds a rate "
                "at half the lowest) or lower the task's learning rate, which the rates are "
                "centred on"
            )
        if len(too_high) < len(missed):
            others = "at the other batches, " if too_high else ""
            text += (
                f"; {others}raise --max-epochs (the passes over the data a trial may take before "
                "any rate has reached the target) or ease the target to measure it"
            )
        return text + "." + self._closest_miss_text()

    def _closest_miss_text(self) -> str:
        """How near the trials at the batches that missed the target came, at their last
        evaluation; and, for a target above 1 on a metric that stayed within 0-1, that it may
        be a percent. Trials pruned at batches that did reach it are no measure of those."""
        import math

        from batchfit.sweep.target import parse_target

        target = parse_target(self.target)
        missed = {batch for batch, _ in self.missed()}
        values = [
            trial.metric
            for trial in self.trials
            if trial.batch in missed
            and not trial.reached
            and trial.metric is not None
            and math.isfinite(trial.metric)
        ]
        if not values:
            return ""
        closest = max(values) if target.op == ">=" else min(values)
        text = f" The closest of those trials ended at {target.metric} {closest:.4g}."
        if target.op == ">=" and target.value > 1 and 0 <= min(values) and max(values) <= 1:
            text += (
                f" {target.metric} stayed within 0-1 in every trial that missed: if it is a "
                f"fraction, the target reads {target.metric}>={target.value / 100:g}."
            )
        return text

    def describe(self) -> str:
        """What the sweep means, in a sentence or two."""
        crit = self.critical_batch
        edges = self.edge_rates()
        reached = [point.steps for point in self.points if point.steps is not None]
        if reached and max(reached) <= 1:
            # The first evaluation is after step 1: a target met there measures nothing.
            return (
                f"No critical batch: {self.target} was reached at the first evaluation (step 1) "
                "at every batch, so steps cannot fall with the batch; give a harder target."
                + self._missed_text()
            )
        edge_text = ""
        if edges:
            shown = ", ".join(f"{batch} ({side})" for batch, side in edges)
            edge_text = (
                f" At batch {shown} the best rate was at the edge of the rates tried: a better "
                "one may lie beyond, so those steps are upper bounds and the fit and the rate "
                "exponent rest on them; raise --widen."
            )
        edge_text += self._missed_text()
        if crit is None:
            return f"No critical batch. {self.fit_reason}{edge_text}"
        # The batches that reached the target: the fit rests on them alone.
        measured = [point.batch for point in self.points if point.steps is not None]
        largest, smallest = max(measured), min(measured)
        if crit >= largest:
            text = (
                f"Critical batch about {crit:,.0f} samples (E_min/S_min), at or beyond the largest "
                f"batch measured ({largest}): doubling the batch still nearly halved the steps "
                f"to {self.target} there; measure larger batches to place it."
            )
        elif crit < smallest:
            text = (
                f"Critical batch about {crit:,.0f} samples (E_min/S_min), below the smallest batch "
                f"measured ({smallest}): doubling the batch already saved few steps to "
                f"{self.target} there, so the value is extrapolated; measure smaller batches to "
                "place it."
            )
        else:
            text = (
                f"Critical batch about {crit:,.0f} samples (E_min/S_min): below it doubling the "
                f"batch nearly halves the steps to {self.target}; above it, samples are wasted."
            )
        noise = (self.noise_scale or {}).get("noise_scale_samples")
        if noise:
            text += f" The noise scale predicted {noise:,.0f} ({noise / crit:.2g}x measured)."
        if self.lr_exponent is not None:
            rule = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}.get(self.lr_rule)
            text += f" The best rate grew as B^{self.lr_exponent:.2f}"
            text += f" (the {self.lr_rule} rule assumes B^{rule:g})." if rule is not None else "."
        return text + edge_text
