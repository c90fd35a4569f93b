"""Paired bootstrap intervals over questions: one candidate against plain, and a simultaneous band
over many candidates.

Why simultaneous: a strength chosen on validation is the best of many candidates (two modes x the
mu grid, ~38), so its own 95% interval is optimistic: among 38 candidates that help nobody, the
best one's per-candidate interval lies above 0 far more often than 5% of the time (the winner's
curse). The band of :func:`simultaneous_band` covers every candidate's mean difference at once
with 95% probability (the max-statistic, or sup-t, band: the 95% quantile of the largest
studentised deviation over all candidates in each replicate), so the chosen one's lower end is
honest whichever candidate was chosen.

Resampling is over questions (the unit that varies), paired (plain and every candidate of a
replicate see the same questions). The numbers do not depend on the thread count: the indices come
from a seeded CPU generator, and each replicate's sums run over the questions in a fixed order, one
elementwise float64 add per question (no reduction kernel whose split depends on the threads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

#: replicates and seed of every interval the project reports (fixed: a rerun gives the same interval)
REPLICATES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval at ``level`` (e.g. a mean difference, steered - plain)."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Interval:
        return cls(float(data["estimate"]), float(data["low"]), float(data["high"]), float(data["level"]))

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. points: x 100)."""
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.level)


def resample_indices(n: int, replicates: int = REPLICATES, seed: int = SEED) -> torch.Tensor:
    """(replicates, n) question indices drawn with replacement, from a seeded CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(n, (replicates, n), generator=generator)


def ordered_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean along dim 0 of a float64 (m, K) tensor, one elementwise add per row in row order."""
    total = torch.zeros(values.shape[1:], dtype=torch.float64)
    for row in values:
        total += row
    return total / values.shape[0]


def resampled_means(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(replicates, K) means of the (n, K) ``values`` over each replicate's questions, in float64,
    summed question by question in a fixed order (the same bits at any thread count)."""
    values = values.detach().to("cpu", torch.float64).reshape(values.shape[0], -1)
    totals = torch.zeros(indices.shape[0], values.shape[1], dtype=torch.float64)
    for column in range(indices.shape[1]):
        totals += values[indices[:, column]]
    return totals / indices.shape[1]


def ordered_std(values: torch.Tensor) -> torch.Tensor:
    """The sample standard deviation along dim 0, summed in row order (see :func:`ordered_mean`)."""
    return (ordered_mean((values - ordered_mean(values)).square()) * (values.shape[0] / (values.shape[0] - 1))).sqrt()


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile along dim 0 (float64, linear interpolation: numpy's default)."""
    return torch.quantile(values, q, dim=0)


def _complete_rows(differences: torch.Tensor) -> torch.Tensor:
    """The rows (questions) with a finite value in every column (a metric an item does not feed is NaN)."""
    differences = differences.detach().to("cpu", torch.float64)
    return differences[torch.isfinite(differences).all(dim=-1)] if differences.dim() > 1 else \
        differences[torch.isfinite(differences)]


def paired_bootstrap(differences: torch.Tensor, level: float = LEVEL, replicates: int = REPLICATES,
                     seed: int = SEED) -> Interval | None:
    """The percentile interval of the mean of per-question ``differences`` (n,) (candidate - plain,
    paired by question); None without a question."""
    differences = _complete_rows(differences.reshape(-1))
    if differences.numel() == 0:
        return None
    means = resampled_means(differences[:, None], resample_indices(differences.numel(), replicates, seed))[:, 0]
    alpha = (1.0 - level) / 2
    low, high = _quantile(means, alpha).item(), _quantile(means, 1.0 - alpha).item()
    return Interval(float(ordered_mean(differences[:, None])[0]), low, high, level)


def simultaneous_band(differences: torch.Tensor, level: float = LEVEL, replicates: int = REPLICATES,
                      seed: int = SEED) -> list[Interval] | None:
    """Intervals of the mean of each column of the (n, K) per-question ``differences`` that hold
    for all K columns at once with probability ``level`` (max-statistic / sup-t band).

    In each replicate every column's mean is studentised by its bootstrap standard error and the
    largest absolute deviation over the columns is kept; the band is mean +- c * se with c that
    statistic's ``level`` quantile. A column without spread (e.g. mu = 0, identical to plain) has
    the interval [mean, mean] and takes no part in the maximum. None without a question."""
    differences = _complete_rows(differences)
    if differences.shape[0] == 0:
        return None
    means = ordered_mean(differences)
    boot = resampled_means(differences, resample_indices(differences.shape[0], replicates, seed))
    se = ordered_std(boot)
    spread = se > 1e-12
    if not bool(spread.any()):
        return [Interval(float(m), float(m), float(m), level) for m in means]
    deviations = ((boot[:, spread] - means[spread]).abs() / se[spread]).amax(dim=1)
    critical = _quantile(deviations, level).item()
    if not math.isfinite(critical):
        raise ValueError("the bootstrap band is not finite (non-finite per-question values?)")
    return [Interval(float(m), float(m - critical * s), float(m + critical * s), level)
            for m, s in zip(means, torch.where(spread, se, torch.zeros_like(se)))]
