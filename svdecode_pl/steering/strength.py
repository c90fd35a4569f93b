"""The one owner of strength choice: which (mode, mu) a run steers at, and why.

Everything a run knows about its strength lives here as typed records: the candidates
(:class:`Candidate`), each mode's estimates (:class:`ModeEstimates`: the paper's mu*, the same fit
held out, the fit under the confidence filter), the grid's conversion to absolute strengths
(:func:`absolute_grid`), the one "best" rule (:func:`best_index`), the significance guard, and the
record of the choice (:class:`StrengthChoice`) that the vector carries and every reader (console,
results.json, report) reads.

Rules (``steering.strength``):

- ``validation`` (the default): both modes (or the pinned one) along the mu grid are scored on the
  validation split in one pass. A candidate is eligible only where no reported metric falls on
  validation (its mean gain over plain is not below 0: a selection metric such as mean(MC1, MC2)
  can rise while MC1 falls, the paper's own hazard). The eligible (mode, mu) with the best
  selection metric is taken only where the guard passes: its gain over plain is significant in a
  simultaneous 95% band over all candidates (:func:`svdecode_pl.metrics.bootstrap.simultaneous_band`:
  the best of ~38 candidates would pass a per-candidate interval far too often), and its estimated
  gain is at least the minimum practical gain (``steering.min_gain``, :data:`MIN_GAIN`). A
  generation task that chose on its reference answers also decodes the chosen candidate once
  (:func:`confirm`): no decoded metric may fall significantly either. Otherwise the run steers at
  mu = 0.
- ``mu_star``, ``mu_star_heldout``, ``mu_star_filtered``: that estimate (x ``mu_scale``); a fixed
  number: that strength. No guard (an explicit choice); the validation gain is still recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from svdecode_pl.metrics.bootstrap import LEVEL, Interval, ordered_mean, paired_bootstrap, simultaneous_band

SteeringMode = Literal["static", "dynamic"]
MODES: tuple[SteeringMode, ...] = ("static", "dynamic")
EstimateName = Literal["mu_star", "mu_star_heldout", "mu_star_filtered"]
ESTIMATES: tuple[EstimateName, ...] = ("mu_star", "mu_star_heldout", "mu_star_filtered")
RuleName = Literal["validation", "mu_star", "mu_star_heldout", "mu_star_filtered"]
RULES: tuple[str, ...] = ("validation", *ESTIMATES)
#: the rule a run uses unless told otherwise
DEFAULT_RULE: RuleName = "validation"
#: The paper names the confidence-aware constraint but its text here (abstract and project page,
#: shared/paper) gives no value; 0.01 (p_phi >= 1%) is the middle of the project's ablation set.
FILTER_THRESHOLD = 0.01
#: The minimum practical gain (a fraction of the selection metric: 0.01 = one point) a choice must
#: reach on validation. Fixed at one point before the fourth family member was built: a smaller gain
#: is below what a TruthfulQA table resolves, yet steering for it still moves every logit. On
#: svdecode-mini-garden at 80 warm-start steps (plain MC1 100% on validation) a significant
#: +0.16-point gain was steered for, and test MC1 fell 100 -> 98; no passed choice on the tuning
#: members gained less than 5.8 points, so this floor changes none of them.
MIN_GAIN = 0.01
#: A metric "falls" on validation below this mean gain (float rounding is no fall).
FALL_TOLERANCE = 1e-9
#: the one console line of a run whose guard failed
STEERING_OFF = "no strength beat plain on validation: steering off"


@dataclass(frozen=True)
class Candidate:
    """A (mode, strength) pair that can be scored and steered at."""

    mode: SteeringMode
    mu: float

    def __str__(self) -> str:
        return f"{self.mode} mu={self.mu:.4g}"


@dataclass(frozen=True)
class ModeEstimates:
    """One mode's strength estimates (None: not computed, e.g. no validation split)."""

    mu_star: float | None = None
    mu_star_heldout: float | None = None
    mu_star_filtered: float | None = None

    def get(self, name: str) -> float | None:
        return getattr(self, name)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class SelectionMetric:
    """What chooses a strength: the per-question mean of ``metrics``; and the metrics that must not
    fall on validation (``guarded``). MC tasks select on mean(MC1, MC2): MC2 alone (the mass on
    the true answers) rose while MC1 (the top answer) fell, as in 5 of the paper's 12 rows."""

    metrics: tuple[str, ...]
    guarded: tuple[str, ...] = ()
    source: Literal["scores", "references", "decoding"] = "scores"

    @property
    def name(self) -> str:
        return self.metrics[0] if len(self.metrics) == 1 else f"mean({', '.join(self.metrics)})"


def absolute_grid(grid: list[float] | None, relative: bool, mu_star: float | None) -> list[float]:
    """The grid's absolute strengths: multiples of the mode's mu* when ``relative`` (none without
    a mu*), else the grid itself."""
    if not grid:
        return []
    if not relative:
        return [float(m) for m in grid]
    return [] if mu_star is None else [float(m) * mu_star + 0.0 for m in grid]


def grid_candidates(grid: list[float] | None, relative: bool, estimates: dict[str, ModeEstimates],
                    modes: tuple[str, ...]) -> list[Candidate]:
    """Every mode's grid strengths as candidates, static first (each (mode, mu) once)."""
    candidates = [Candidate(mode, mu) for mode in modes
                  for mu in absolute_grid(grid, relative, estimates.get(mode, ModeEstimates()).mu_star)]
    return list(dict.fromkeys(candidates))


def estimate_candidates(estimates: dict[str, ModeEstimates]) -> dict[tuple[str, str], Candidate]:
    """(mode, estimate name) -> the candidate at that estimate, for every estimate with a value."""
    return {(mode, name): Candidate(mode, value) for mode, found in estimates.items()
            for name in ESTIMATES if (value := found.get(name)) is not None}


def best_index(candidates: list[Candidate], values: list[float | None], tolerance: float = 1e-6) -> int | None:
    """The one "best" rule: the candidate with the highest value; among equals (within
    ``tolerance``: float rounding is no difference) the smallest |mu| (the least change to the
    warm-started model), then static (the cheaper mode). None when no value is known."""
    known = [(v, i) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not known:
        return None
    top = max(v for v, _ in known)
    tied = [i for v, i in known if v >= top - tolerance]
    return min(tied, key=lambda i: (abs(candidates[i].mu), candidates[i].mode != "static"))


@dataclass
class ValidationScores:
    """Per-question metrics on the validation split: ``plain`` (n, M) and ``values`` (n, K, M) at
    each of K candidates, for the M ``metrics`` (NaN where an item feeds no value)."""

    metrics: list[str]
    candidates: list[Candidate]
    plain: torch.Tensor
    values: torch.Tensor

    def differences(self, metrics: tuple[str, ...], columns: list[int]) -> torch.Tensor:
        """(n, len(columns)) per-question gain over plain of the mean of ``metrics``."""
        index = [self.metrics.index(m) for m in metrics]
        plain = self.plain[:, index].mean(-1, keepdim=True)
        return self.values[:, columns][..., index].mean(-1) - plain

    def columns(self, candidates: list[Candidate]) -> list[int]:
        return [self.candidates.index(c) for c in candidates]


@dataclass(frozen=True)
class StrengthChoice:
    """How a run's strength was chosen: what it steers at and why."""

    rule: str
    """``validation``, an estimate's name, or ``fixed``."""
    mode: SteeringMode
    mu: float
    """The strength steered at (0.0: steering off), ``mu_scale`` applied once."""
    reason: str
    selection_metric: str | None = None
    guard_passed: bool | None = None
    """Validation rule: whether the guard let the choice through; None: no guard (explicit rule)."""
    validation_gain: Interval | None = None
    """The chosen candidate's selection-metric gain over plain on validation, with its interval."""
    estimates: dict[str, ModeEstimates] = field(default_factory=dict)
    validation_curves: dict[str, dict[str, list]] | None = None
    """mode -> {"mu": [...], "gain": [...]}: the selection metric's mean gain at each grid strength."""
    mu_scale: float = 1.0
    min_gain: float | None = None
    """Validation rule: the minimum practical gain the guard asked for; None: no guard."""

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.mode, self.mu)

    def summary(self) -> dict[str, Any]:
        """results.json's ``steering.choice``."""
        return {"mode": self.mode, "mu": self.mu, "rule": self.rule, "selection_metric": self.selection_metric,
                "guard_passed": self.guard_passed,
                "validation_gain": None if self.validation_gain is None else self.validation_gain.to_dict(),
                "reason": self.reason, "mu_scale": self.mu_scale, "min_gain": self.min_gain,
                "validation_curves": self.validation_curves}

    def to_dict(self) -> dict[str, Any]:
        """The artifact's ``strength_choice``: the summary and every mode's estimates."""
        return {**self.summary(), "estimates": {m: e.to_dict() for m, e in self.estimates.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StrengthChoice:
        gain = data.get("validation_gain")
        estimates, curves = data.get("estimates") or {}, data.get("validation_curves")
        return cls(rule=data["rule"], mode=data["mode"], mu=float(data["mu"]), reason=data.get("reason", ""),
                   selection_metric=data.get("selection_metric"), guard_passed=data.get("guard_passed"),
                   validation_gain=None if gain is None else Interval.from_dict(gain),
                   estimates={m: ModeEstimates(**estimates[m]) for m in MODES if m in estimates},
                   validation_curves=None if curves is None else {m: curves[m] for m in MODES if m in curves},
                   mu_scale=float(data.get("mu_scale", 1.0)),
                   min_gain=None if data.get("min_gain") is None else float(data["min_gain"]))

    @classmethod
    def legacy(cls, mode: SteeringMode, mu: float, metadata: dict[str, Any]) -> StrengthChoice:
        """The record of a format-1 artifact, from its loose metadata keys (``strength``,
        ``estimates``, ``mu_scale``): chosen before the guard existed."""
        names = {"validation_best": "validation", "mu": "fixed"}
        recorded = metadata.get("estimates") or {"mu_star": metadata.get("mu_star")}
        estimates = ModeEstimates(**{k: recorded.get(k) for k in ESTIMATES})
        rule = names.get(metadata.get("strength", "mu_star"), metadata.get("strength", "mu_star"))
        return cls(rule=rule, mode=mode, mu=float(mu), reason="format-1 artifact: chosen without the guard",
                   estimates={mode: estimates}, mu_scale=float(metadata.get("mu_scale") or 1.0))


def _validation_curves(scores: ValidationScores, selection: SelectionMetric,
                       candidates: list[Candidate]) -> dict[str, dict[str, list]]:
    gains = ordered_mean(scores.differences(selection.metrics, scores.columns(candidates))).tolist()
    curves: dict[str, dict[str, list]] = {}
    for candidate, gain in zip(candidates, gains):
        curve = curves.setdefault(candidate.mode, {"mu": [], "gain": []})
        curve["mu"].append(candidate.mu)
        curve["gain"].append(gain)
    return curves


def falling_metrics(scores: ValidationScores, selection: SelectionMetric,
                    candidates: list[Candidate]) -> list[str | None]:
    """Per candidate: the first guarded metric whose mean validation gain is below 0, with that gain
    in points (None: no metric falls, the candidate is eligible). Sums in question order."""
    columns = scores.columns(candidates)
    gains = {}
    for metric in (m for m in selection.guarded if m in scores.metrics):
        difference = scores.differences((metric,), columns)
        known = torch.isfinite(difference)
        gains[metric] = ordered_mean(torch.where(known, difference, 0.0)) * len(difference) / known.sum(0).clamp(min=1)
    return [next((f"{metric} {100 * float(gain[k]):+.2f} points" for metric, gain in gains.items()
                  if gain[k] < -FALL_TOLERANCE), None) for k in range(len(candidates))]


def guard(selection: SelectionMetric, chosen: Candidate, gain: Interval, candidates: int,
          min_gain: float = MIN_GAIN, passed_over: str = "") -> tuple[bool, str]:
    """Whether the chosen (eligible) candidate may be steered at, and why (in points). ``candidates``:
    how many the band covers; ``passed_over``: what a better, ineligible candidate did."""
    points = gain.scaled(100.0)
    said = f"{chosen}: {selection.name} gain {points.estimate:+.2f} points [{points.low:+.2f}, {points.high:+.2f}]"
    if chosen.mu == 0.0:
        passed, reason = False, f"the best candidate is mu = 0 ({chosen.mode})"
    elif not gain.low > 0.0:
        passed, reason = False, f"{said} is not significant (simultaneous {100 * gain.level:.0f}% band)"
    elif gain.estimate < min_gain:
        passed, reason = False, f"{said} is below the minimum practical gain of {100 * min_gain:.2f} points " \
                                "(steering.min_gain)"
    else:
        passed, reason = True, f"{said} (simultaneous {100 * gain.level:.0f}% band over {candidates} candidates)"
    return passed, reason + passed_over


def choose_on_validation(scores: ValidationScores | None, selection: SelectionMetric,
                         grid: list[Candidate], estimates: dict[str, ModeEstimates],
                         pinned: SteeringMode | None, min_gain: float = MIN_GAIN) -> StrengthChoice:
    """The ``validation`` rule: the best grid candidate on validation, behind the guard."""
    off_mode: SteeringMode = pinned or "static"
    common = {"rule": "validation", "selection_metric": selection.name, "estimates": estimates, "min_gain": min_gain}
    if scores is None or not grid:
        why = "no validation split" if scores is None else "no grid strength to choose from"
        return StrengthChoice(mode=off_mode, mu=0.0, guard_passed=False,
                              reason=f"{why}: nothing to choose a strength on; steering off", **common)
    band = simultaneous_band(scores.differences(selection.metrics, scores.columns(grid)))
    if band is None:
        return StrengthChoice(mode=off_mode, mu=0.0, guard_passed=False,
                              reason="no validation question has a value: steering off", **common)
    falls = falling_metrics(scores, selection, grid)
    index = best_index(grid, [None if fall else interval.estimate for interval, fall in zip(band, falls)])
    best = best_index(grid, [interval.estimate for interval in band])
    if index is None:
        return StrengthChoice(mode=off_mode, mu=0.0, guard_passed=False, reason="every candidate lets a reported "
                              "metric fall on validation: steering off", **common)
    passed_over = "" if best == index else f"; {grid[best]} gained more " \
        f"({100 * band[best].estimate:+.2f} points) but {falls[best]} on validation"
    chosen, gain = grid[index], band[index]
    passed, reason = guard(selection, chosen, gain, len(grid), min_gain, passed_over)
    steered = chosen if passed else Candidate(off_mode, 0.0)  # off: static unless pinned (no base model needed)
    return StrengthChoice(mode=steered.mode, mu=steered.mu, guard_passed=passed, validation_gain=gain,
                          reason=reason, validation_curves=_validation_curves(scores, selection, grid), **common)


def confirm(choice: StrengthChoice, scores: ValidationScores | None, pinned: SteeringMode | None,
            what: str = "decoded") -> StrengthChoice:
    """The guard's second condition on a second look at the validation split (a generation task
    chosen on its reference answers: the chosen candidate decoded, ``scores`` its one column): a
    metric that falls significantly there steers off. Reference likelihoods and decoded text can
    disagree (benchmarks/generation_selection.py measured it), so the cheap choice is checked
    where the task's own metrics live, at the cost of two decodings (plain and chosen)."""
    if scores is None or not choice.guard_passed:
        return choice
    column = scores.columns([choice.candidate])
    for metric in scores.metrics:
        interval = paired_bootstrap(scores.differences((metric,), column)[:, 0], LEVEL)
        if interval is not None and interval.high < 0.0:
            reason = (f"{choice.reason}; but {what} {metric} falls significantly on validation "
                      f"(difference [{interval.low:+.4g}, {interval.high:+.4g}] in its own units)")
            return replace(choice, mode=pinned or "static", mu=0.0, guard_passed=False, reason=reason)
    return choice


def rule_candidates(rule: str | float, estimates: dict[str, ModeEstimates], modes: tuple[str, ...],
                    mu_scale: float = 1.0) -> list[Candidate]:
    """The candidates an explicit rule offers, one per mode that has its value (x ``mu_scale``)."""
    if isinstance(rule, (int, float)):
        return [Candidate(mode, float(rule) * mu_scale) for mode in modes]
    values = {mode: estimates.get(mode, ModeEstimates()).get(rule) for mode in modes}
    return [Candidate(mode, value * mu_scale + 0.0) for mode, value in values.items() if value is not None]


def choose_by_rule(rule: str | float, scores: ValidationScores | None, selection: SelectionMetric,
                   estimates: dict[str, ModeEstimates], modes: tuple[str, ...],
                   mu_scale: float = 1.0) -> StrengthChoice:
    """An explicit rule (an estimate's name or a fixed number). With both modes open the mode is
    chosen on validation (static without a validation split); an estimate no mode has falls back
    to the paper's mu*."""
    name = "fixed" if isinstance(rule, (int, float)) else rule
    offered = rule_candidates(rule, estimates, modes, mu_scale)
    reason = f"the {name} rule" + ("" if name != "fixed" else f" ({float(rule):g})")
    if not offered:
        offered = rule_candidates("mu_star", estimates, modes, mu_scale)
        name, reason = "mu_star", f"{rule} has no value (no validation split?): the paper's mu*"
    if not offered:
        return StrengthChoice(rule=name, mode=modes[0], mu=0.0, reason="no estimate has a value: steering off",
                              estimates=estimates, mu_scale=mu_scale)
    gain = None
    index = 0
    if scores is not None and all(c in scores.candidates for c in offered):
        band = simultaneous_band(scores.differences(selection.metrics, scores.columns(offered)))
        if band is not None:
            index = best_index(offered, [interval.estimate for interval in band])
            gain = band[index]
            if len(offered) > 1:
                reason += f"; mode {offered[index].mode} chosen on validation"
    chosen = offered[index]
    return StrengthChoice(rule=name, mode=chosen.mode, mu=chosen.mu, reason=reason + " (no guard)",
                          selection_metric=selection.name if gain is not None else None,
                          validation_gain=gain, estimates=estimates, mu_scale=mu_scale)


def choose(rule: str | float, scores: ValidationScores | None, selection: SelectionMetric, grid: list[Candidate],
           estimates: dict[str, ModeEstimates], pinned: SteeringMode | None, mu_scale: float = 1.0,
           min_gain: float = MIN_GAIN) -> StrengthChoice:
    """The run's choice under ``rule`` (see the module's docstring); ``pinned``: the mode given;
    ``min_gain``: the validation rule's minimum practical gain."""
    if rule == "validation":
        return choose_on_validation(scores, selection, grid, estimates, pinned, min_gain)
    return choose_by_rule(rule, scores, selection, estimates, (pinned,) if pinned else MODES, mu_scale)


def describe(choice: StrengthChoice) -> str:
    """The console's one line about the choice."""
    if choice.rule == "validation" and not choice.guard_passed:
        return STEERING_OFF if choice.validation_gain is not None else f"{choice.reason}"
    return f"steering at {choice.candidate} ({choice.rule} rule): {choice.reason}"
