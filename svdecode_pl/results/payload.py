"""results.json and the printed results table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from svdecode_pl.evaluation.columns import Column
from svdecode_pl.evaluation.items import VARIANTS
from svdecode_pl.evaluation.settings import SteeringSettings
from svdecode_pl.metrics.bootstrap import paired_bootstrap
from svdecode_pl.steering.strength import ESTIMATES, Candidate
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.files import atomic_write_text, json_text


def _column_means(columns: list[Column], rows: torch.Tensor) -> dict[Column, float | None]:
    """Mean of each column over the rows where it has a value (None: no value)."""
    means = {}
    for index, column in enumerate(columns):
        values = rows[:, index]
        values = values[~values.isnan()]
        means[column] = float(values.mean()) if values.numel() else None
    return means


def table_metrics(
    names: list[str], columns: list[Column], group_names: list[str], groups: torch.Tensor, values: torch.Tensor
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, dict[str, float | None]]]]:
    """Means of a :class:`~svdecode_pl.metrics.per_question.QuestionTable` (:class:`Column` s) over
    all questions and per group: ``{metric: {variant: mean}}`` and ``{group: {metric: {...}}}``.
    A mean over no value (no steering vector, a metric no item fed) is None."""

    def by_metric(rows: torch.Tensor) -> dict[str, dict[str, float | None]]:
        means = _column_means(columns, rows)
        return {name: {variant: means.get(Column(name, variant=variant)) for variant in VARIANTS} for name in names}

    per_group = {name: by_metric(values[groups == g]) for g, name in enumerate(group_names) if (groups == g).any()}
    return by_metric(values), per_group


def candidate_metrics(names: list[str], means: dict[Column, float | None], settings: SteeringSettings,
                      candidate: Candidate) -> dict[str, float | None] | None:
    """The test metrics at ``candidate`` (its grid column); None when it was not scored."""
    column = settings.column(candidate)
    return None if column is None else {m: means.get(Column(m, candidate=column)) for m in names}


def test_curves(names: list[str], columns: list[Column], values: torch.Tensor,
                settings: SteeringSettings) -> dict[str, dict[str, Any]]:
    """Each mode's test metrics along its grid strengths: ``{mode: {"mu": [...], "metrics": {m: [...]}}}``."""
    means = _column_means(columns, values)
    curves = {}
    for mode, strengths in settings.curves.items():
        points = [candidate_metrics(names, means, settings, Candidate(mode, mu)) for mu in strengths]
        if all(p is not None for p in points):
            curves[mode] = {"mu": list(strengths), "metrics": {m: [p[m] for p in points] for m in names}}
    return curves


def estimate_metrics(names: list[str], columns: list[Column], values: torch.Tensor,
                     settings: SteeringSettings) -> dict[str, dict[str, dict[str, Any]]]:
    """Every mode's estimates with the test metrics at each: ``{mode: {name: {"mu", "metrics"}}}``
    (metrics null where not scored: no value, or a mode the vector cannot steer in)."""
    vector = settings.vector
    choice = None if vector is None else vector.choice
    if choice is None:
        return {}
    means = _column_means(columns, values)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mode, found in choice.estimates.items():
        out[mode] = {}
        for name in ESTIMATES:
            mu = found.get(name)
            metrics = None if mu is None else candidate_metrics(names, means, settings, Candidate(mode, mu))
            out[mode][name] = {"mu": mu, "metrics": metrics}
    return out


def test_difference(names: list[str], columns: list[Column],
                    values: torch.Tensor) -> dict[str, dict[str, float] | None]:
    """steered - plain on test per metric, with its paired bootstrap interval over questions."""
    out = {}
    for name in names:
        steered, plain = Column(name, variant="steered"), Column(name, variant="plain")
        if steered not in columns:
            continue
        difference = values[:, columns.index(steered)] - values[:, columns.index(plain)]
        interval = paired_bootstrap(difference)
        out[name] = None if interval is None else interval.to_dict()
    return out


def steering_summary(steering: SteeringVector, estimates: dict[str, Any] | None) -> dict[str, Any]:
    """results.json's ``steering``: what was steered at, the choice's record and the estimates."""
    choice = steering.choice
    return {
        "mode": steering.mode,
        "mu": steering.mu,
        "confidence_threshold": steering.confidence_threshold,
        "mu_star": steering.metadata.get("mu_star"),
        "token_count": steering.metadata.get("token_count"),
        "warm_start_steps": steering.metadata.get("warm_start_steps"),
        "filtered_share": steering.metadata.get("filtered_share"),
        "choice": None if choice is None else choice.summary(),
        "estimates": estimates or {},
    }


def results_payload(
    task: str, n_examples: int, steering: SteeringVector | None, metrics: dict[str, dict[str, float | None]],
    trainer: Any = None, per_group: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
    estimates: dict[str, Any] | None = None, curves: dict[str, Any] | None = None,
    difference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json document: task, size, the steering used (or null) with its strength choice
    and every mode's estimates (test metrics at each), the metrics plain and steered, their paired
    difference with its interval (``test_difference``) and each mode's test curve (``test_curves``)."""
    payload: dict[str, Any] = {"task": task, "n_examples": n_examples}
    if model is not None:
        payload["model"] = model
    payload["steering"] = None if steering is None else steering_summary(steering, estimates)
    payload["metrics"] = metrics
    if difference:
        payload["test_difference"] = difference
    if per_group:
        payload["per_category"] = per_group
    if curves:
        payload["test_curves"] = curves
    if trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
        payload["data"] = getattr(datamodule, "source", None)
        payload["world_size"] = trainer.world_size
    return payload


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a crash never leaves a half-written results.json behind."""
    return atomic_write_text(path, json_text(payload, indent=2) + "\n")  # never NaN: valid JSON always


def is_fraction(metric: str) -> bool:
    """Whether a metric is a share in [0, 1] (printed in %); BLEU and ROUGE are on lm-eval's 0-100 scale."""
    base = metric.split("/")[0]
    return not (base.startswith(("bleu", "rouge")) and not base.endswith("_acc"))


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{scale * value:6.2f}"


def _cells(metrics: dict[str, float | None] | None, names: list[str], width: int = 8) -> str:
    metrics = metrics or {}
    return "".join(f"{_fmt(metrics.get(n), 100.0 if is_fraction(n) else 1.0):>{width}}" for n in names)


def _choice_line(steering: dict[str, Any]) -> list[str]:
    """The strength choice: what, by which rule, its validation gain with the interval."""
    choice = steering.get("choice")
    if not choice:
        return []
    gain = choice.get("validation_gain")
    interval = "" if gain is None else (
        f"; validation gain {100 * gain['estimate']:+.2f} points [{100 * gain['low']:+.2f}, "
        f"{100 * gain['high']:+.2f}] ({100 * gain['level']:.0f}%, {choice['selection_metric']})")
    if choice["rule"] == "validation" and not choice["guard_passed"]:
        return [f"strength: steering off (mu = 0){interval}: {choice['reason']}"]
    return [f"strength: {choice['mode']} mu={choice['mu']:.4g} ({choice['rule']} rule){interval}"]


def _estimate_lines(payload: dict[str, Any]) -> list[str]:
    """Every mode's estimates side by side, with the test metrics at each."""
    estimates = (payload.get("steering") or {}).get("estimates") or {}
    if not estimates:
        return []
    names = [n for n in payload["metrics"] if "/" not in n]
    modes = list(estimates)
    header = "".join(f" | {mode + ' mu':>12}" + "".join(f"{n:>8}" for n in names) for mode in modes)
    lines = ["strength estimates (test metrics at each, both modes):", f"  {'estimate':<18}{header}"]
    for name in ESTIMATES:
        row = ""
        for mode in modes:
            entry = estimates[mode].get(name) or {}
            mu = "-" if entry.get("mu") is None else f"{entry['mu']:.4g}"
            row += f" | {mu:>12}" + _cells(entry.get("metrics"), names)
        lines.append(f"  {name:<18}{row}")
    return lines


def _curve_lines(payload: dict[str, Any]) -> list[str]:
    """Each mode's test curve, one line per metric."""
    lines = []
    for mode, curve in (payload.get("test_curves") or {}).items():
        strengths = ", ".join(f"{m:.3g}" for m in curve["mu"])
        lines.append(f"test curve, {mode} (mu: {strengths}):")
        for name, values in curve["metrics"].items():
            if "/" not in name:
                scale = 100.0 if is_fraction(name) else 1.0
                lines.append(f"  {name:<10} " + " ".join(_fmt(v, scale).strip() for v in values))
    return lines


def format_table(payload: dict[str, Any]) -> str:
    """A small text table: the strength choice, one row per metric (plain / steered / difference with
    its paired interval, in %), each mode's test curve and the estimates side by side."""
    steering = payload.get("steering")
    title = f"{payload['task']} ({payload['n_examples']} questions)"
    if steering:
        title += f", steering {steering['mode']} mu={steering['mu']:.4g}"
    lines = [title, *(_choice_line(steering) if steering else [])]
    differences = payload.get("test_difference") or {}
    lines.append(f"{'metric':<12}{'plain':>9}{'steered':>9}{'delta':>9}   paired 95% interval")
    for name, values in payload["metrics"].items():
        plain, steered = values.get("plain"), values.get("steered")
        delta = None if plain is None or steered is None else steered - plain
        scale = 100.0 if is_fraction(name) else 1.0
        interval = differences.get(name)
        bounds = "" if not interval else f"   [{scale * interval['low']:+.2f}, {scale * interval['high']:+.2f}]"
        lines.append(f"{name:<12}{_fmt(plain, scale):>9}{_fmt(steered, scale):>9}{_fmt(delta, scale):>9}{bounds}")
    lines += _curve_lines(payload)
    lines += _estimate_lines(payload)
    if payload.get("model", {}).get("name_or_path", "").startswith("svdecode-tiny"):
        lines.append("(a tiny model built in code: the effect of steering is near zero here; see README)")
    return "\n".join(lines)
