"""Fit steps to target against batch size: S = S_min + E_min / B (McCandlish et al. 2018).

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162), eq. 2.11: (S / S_min - 1)(E / E_min - 1) = 1 with E = B S, which is
S = S_min + E_min / B. S_min is the fewest steps any batch can take, E_min the fewest samples
any batch can use, and the critical batch B_crit = E_min / S_min is where training takes twice
S_min steps and twice E_min samples. The fit is least squares on relative errors (steps at small
batches are large numbers and would otherwise dominate), linear in (S_min, E_min).
The best-rate exponent is the slope of log(best rate) against log(batch): about 1 where the
linear rule holds (Goyal et al. 2017), about 0.5 for the square-root rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from batchfit.errors import ConfigError

__all__ = ["StepsFit", "fit_steps", "rate_exponent"]

NEGLIGIBLE = 1e-9
"""A fitted term adding less than this fraction of the largest measured steps at every batch is
rounding error of the least-squares solve, taken as 0 (equal steps at every batch give E_min of
about +-1e-14, whose sign must not decide between "B_crit of 0" and "no 1/B part")."""


@dataclass(frozen=True)
class StepsFit:
    """The fitted S(B) = S_min + E_min / B.

    Attributes:
        min_steps: S_min, the steps to target of an infinitely large batch.
        min_samples: E_min, the samples to target of an infinitely small batch.
        critical_batch: B_crit = E_min / S_min in samples; None when the fit has no plateau
            (S_min <= 0: steps still fall as 1/B at the largest batch, B_crit is above the grid)
            or no 1/B part (E_min <= 0: B_crit is below the grid).
        points: batches the fit used.
        reason: empty when `critical_batch` is set, else one sentence.
    """

    min_steps: float
    min_samples: float
    critical_batch: float | None
    points: int
    reason: str = ""

    def steps_at(self, batch: float) -> float:
        """The fitted steps to target at `batch` samples."""
        return self.min_steps + self.min_samples / batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_steps(batches: Sequence[float], steps: Sequence[float]) -> StepsFit:
    """Fit S = S_min + E_min / B to steps-to-target measured at several batch sizes.

    Args:
        batches: global batch sizes in samples.
        steps: steps to target at each; inf or nan entries (target not reached) are left out.

    Returns:
        A `StepsFit`; exact data give S_min and E_min back exactly.

    Raises:
        ConfigError: fewer than two batches reached the target.

    Example:
        >>> fit = fit_steps([8, 16, 32, 64], [10 + 800 / b for b in (8, 16, 32, 64)])
        >>> round(fit.min_steps, 6), round(fit.min_samples, 6), round(fit.critical_batch, 6)
        (10.0, 800.0, 80.0)
    """
    import numpy as np

    pairs = [
        (float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s)
    ]
    if len({b for b, _ in pairs}) < 2:
        raise ConfigError(
            f"The fit S = S_min + E_min/B needs steps at two batch sizes or more; {len(pairs)} "
            "reached the target. Ease the target, or add batch sizes that reach it."
        )
    inverse = np.array([1 / b for b, _ in pairs])
    measured = np.array([s for _, s in pairs])
    # Relative errors: divide each row by the measured steps.
    design = np.stack([np.ones_like(inverse), inverse], axis=1) / measured[:, None]
    solution, *_ = np.linalg.lstsq(design, np.ones_like(measured), rcond=None)
    min_steps, min_samples = (float(value) for value in solution)
    largest = float(measured.max())
    if abs(min_steps) <= NEGLIGIBLE * largest:
        min_steps = 0.0
    if abs(min_samples) * float(inverse.max()) <= NEGLIGIBLE * largest:
        min_samples = 0.0
    critical, reason = None, ""
    if min_steps <= 0:
        reason = (
            "No plateau: steps still fall about as 1/B at the largest batch, so B_crit lies "
            "above the grid; add larger batches."
        )
    elif min_samples <= 0:
        reason = (
            "No 1/B part: steps do not fall with the batch, so B_crit lies below the grid; add "
            "smaller batches."
        )
    else:
        critical = min_samples / min_steps
    return StepsFit(
        min_steps=min_steps,
        min_samples=min_samples,
        critical_batch=critical,
        points=len(pairs),
        reason=reason,
    )


def rate_exponent(batches: Sequence[float], rates: Sequence[float | None]) -> float | None:
    """The slope of log(rate) against log(batch), or None with fewer than two points.

    Example:
        >>> rate_exponent([16, 64, 256], [0.1, 0.2, 0.4])
        0.5
    """
    import numpy as np

    pairs = [(b, r) for b, r in zip(batches, rates) if r is not None]
    if len({b for b, _ in pairs}) < 2:
        return None
    x = np.log([b for b, _ in pairs])
    y = np.log([r for _, r in pairs])
    # + 0.0 turns the -0.0 of an equal best rate at every batch into 0.0 ("B^-0.00" misleads).
    return float(round(np.polyfit(x, y, 1)[0], 12)) + 0.0
