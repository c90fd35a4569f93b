"""Strength estimates side by side: the paper's mu* and what a researcher would try beside it.

Every run records all of them (``steering.estimates`` in results.json) and steers at one, the
callback's ``strength`` (README, "Which strength"):

- ``mu_star``: the paper's mu*, least squares of the fine-tuning step by the steering direction
  over the calibration tokens (by default the warm-start's own training tokens);
- ``mu_star_heldout``: the same fit on the task's held-out ``validation`` split (tokens the
  warm-start never saw, so the adapter has not already matched them);
- ``mu_star_filtered``: the fit with the confidence-aware constraint at :data:`FILTER_THRESHOLD`,
  applied along the run's own direction;
- ``validation_best``: the strength of the mu grid with the best task metric on the validation
  split (one pass over its items, no test data).
"""

from __future__ import annotations

import math
from typing import Literal

EstimateName = Literal["mu_star", "mu_star_heldout", "mu_star_filtered", "validation_best"]
ESTIMATES: tuple[EstimateName, ...] = ("mu_star", "mu_star_heldout", "mu_star_filtered", "validation_best")

#: The paper names the confidence-aware constraint but its text here (abstract and project page,
#: shared/paper) gives no value; 0.01 (p_phi >= 1%) is the middle of the project's ablation set.
FILTER_THRESHOLD = 0.01

#: The strength a run steers at unless told otherwise, chosen by the measured ablation (README).
DEFAULT_ESTIMATE: EstimateName = "validation_best"


def best_on_curve(grid: list[float], values: list[float | None], tolerance: float = 1e-6) -> float | None:
    """The strength with the highest value; among equals the smallest |mu| (the least change to
    the warm-started model), so a flat curve chooses 0 when the grid holds it."""
    known = [(v, mu) for mu, v in zip(grid, values) if v is not None and math.isfinite(v)]
    if not known:
        return None
    top = max(v for v, _ in known)
    # float rounding (1e-9) is not a difference: a flat curve must not pick its far end
    return min((mu for v, mu in known if v >= top - tolerance), key=abs)


def chosen_strength(estimates: dict[str, float | None], name: str) -> tuple[str, float]:
    """The estimate ``name``, or the paper's mu* when that one could not be computed (no
    validation split, no grid): returns (the name used, its value)."""
    if name not in ESTIMATES:
        raise ValueError(f"strength must be one of {', '.join(ESTIMATES)}, got {name!r}")
    value = estimates.get(name)
    if value is None:
        return "mu_star", float(estimates["mu_star"])
    return name, float(value)
