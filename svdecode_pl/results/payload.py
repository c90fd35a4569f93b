"""results.json and the printed results table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from svdecode_pl.evaluation.items import VARIANTS
from svdecode_pl.steering.estimates import ESTIMATES
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.files import atomic_write_text, json_text


def _column_means(columns: list[str], rows: torch.Tensor) -> dict[str, float | None]:
    """Mean of each column over the rows where it has a value (None: no value)."""
    means = {}
    for index, column in enumerate(columns):
        values = rows[:, index]
        values = values[~values.isnan()]
        means[column] = float(values.mean()) if values.numel() else None
    return means


def table_metrics(
    names: list[str], columns: list[str], group_names: list[str], groups: torch.Tensor, values: torch.Tensor
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, dict[str, float | None]]]]:
    """Means of a :class:`~svdecode_pl.metrics.per_question.QuestionTable` (columns ``<metric>/<variant>``) over
    all questions and per group: ``{metric: {variant: mean}}`` and ``{group: {metric: {...}}}``.
    A mean over no value (no steering vector, a metric no item fed) is None."""

    def by_metric(rows: torch.Tensor) -> dict[str, dict[str, float | None]]:
        means = _column_means(columns, rows)
        return {name: {variant: means.get(f"{name}/{variant}") for variant in VARIANTS} for name in names}

    per_group = {name: by_metric(values[groups == g]) for g, name in enumerate(group_names) if (groups == g).any()}
    return by_metric(values), per_group


def mu_curve(
    names: list[str], columns: list[str], values: torch.Tensor, grid: list[float], steering: SteeringVector
) -> dict[str, Any]:
    """Each metric as a function of the strength mu (columns ``<metric>/mu<i>``), with mu* and the
    best mu on the grid (the first of equals) side by side."""
    means = _column_means(columns, values)
    curves = {name: [means.get(f"{name}/mu{i}") for i in range(len(grid))] for name in names}
    best = {}
    for name, curve in curves.items():
        known = [(v, i) for i, v in enumerate(curve) if v is not None]
        if known:
            value, index = max(known, key=lambda vi: (vi[0], -vi[1]))
            best[name] = {"mu": grid[index], "value": value}
    return {"mu": list(grid), "mu_star": steering.metadata.get("mu_star"), "mu_used": steering.mu,
            "metrics": curves, "best": best}


def estimate_metrics(
    names: list[str], columns: list[str], values: torch.Tensor, estimates: dict[str, float],
    grid_columns: dict[str, int],
) -> dict[str, dict[str, Any]]:
    """The test metrics at each named strength, read from its grid column (``grid_columns``)."""
    means = _column_means(columns, values)
    return {name: {"mu": mu, "metrics": {m: means.get(f"{m}/mu{grid_columns[name]}") for m in names}}
            for name, mu in estimates.items()}


def results_payload(
    task: str, n_examples: int, steering: SteeringVector | None, metrics: dict[str, dict[str, float | None]],
    trainer: Any = None, per_group: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
    mu_curve: dict[str, Any] | None = None, estimates: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The results.json document: task, size, the steering used (or null) and the metrics;
    ``steering.estimates``: every strength estimate, with the test metrics at it (null: not
    computed, e.g. no validation split)."""
    payload: dict[str, Any] = {"task": task, "n_examples": n_examples}
    if model is not None:
        payload["model"] = model
    if steering is None:
        payload["steering"] = None
    else:
        payload["steering"] = {
            "mode": steering.mode,
            "mu": steering.mu,
            "confidence_threshold": steering.confidence_threshold,
            "mu_star": steering.metadata.get("mu_star"),
            "token_count": steering.metadata.get("token_count"),
            "warm_start_steps": steering.metadata.get("warm_start_steps"),
            "filtered_share": steering.metadata.get("filtered_share"),
            "strength": steering.metadata.get("strength", "mu_star"),
            "estimates": _estimates(steering, estimates or {}),
            "validation_curve": steering.metadata.get("validation_curve"),
        }
    payload["metrics"] = metrics
    if per_group:
        payload["per_category"] = per_group
    if mu_curve is not None:
        payload["mu_curve"] = mu_curve
    if trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
        payload["data"] = getattr(datamodule, "source", None)
        payload["world_size"] = trainer.world_size
    return payload


def _estimates(steering: SteeringVector, scored: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every estimate the vector records, with its test metrics where they were scored."""
    recorded = steering.metadata.get("estimates") or {"mu_star": steering.metadata.get("mu_star")}
    return {name: {"mu": recorded[name], "metrics": scored.get(name, {}).get("metrics")}
            for name in ESTIMATES if name in recorded}


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a crash never leaves a half-written results.json behind."""
    return atomic_write_text(path, json_text(payload, indent=2) + "\n")  # never NaN: valid JSON always


def is_fraction(metric: str) -> bool:
    """Whether a metric is a share in [0, 1] (printed in %); BLEU and ROUGE are on lm-eval's 0-100 scale."""
    base = metric.split("/")[0]
    return not (base.startswith(("bleu", "rouge")) and not base.endswith("_acc"))


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{scale * value:6.2f}"


def _estimate_lines(payload: dict[str, Any]) -> list[str]:
    """One line per strength estimate: its value and the test metrics at it (* = the one steered at)."""
    steering = payload.get("steering") or {}
    estimates = steering.get("estimates") or {}
    if not estimates:
        return []
    names = [n for n in payload["metrics"] if "/" not in n]
    lines = ["strength estimates (test metrics at each; * = steered):",
             f"  {'estimate':<18}{'mu':>10}" + "".join(f"{n:>9}" for n in names)]
    for name, entry in estimates.items():
        mark = "*" if name == steering.get("strength") else " "
        mu = "-" if entry["mu"] is None else f"{entry['mu']:.4g}"
        metrics = entry.get("metrics") or {}
        cells = "".join(f"{_fmt(metrics.get(n), 100.0 if is_fraction(n) else 1.0):>9}" for n in names)
        lines.append(f"{mark} {name:<18}{mu:>10}{cells}")
    return lines


def format_table(payload: dict[str, Any]) -> str:
    """A small text table: one row per metric, plain / steered / difference (in %)."""
    steering = payload.get("steering")
    title = f"{payload['task']} ({payload['n_examples']} questions)"
    if steering:
        title += f", steering {steering['mode']} mu={steering['mu']:.4g}"
    lines = [title, f"{'metric':<12}{'plain':>9}{'steered':>9}{'delta':>9}"]
    for name, values in payload["metrics"].items():
        plain, steered = values.get("plain"), values.get("steered")
        delta = None if plain is None or steered is None else steered - plain
        scale = 100.0 if is_fraction(name) else 1.0
        lines.append(f"{name:<12}{_fmt(plain, scale):>9}{_fmt(steered, scale):>9}{_fmt(delta, scale):>9}")
    curve = payload.get("mu_curve")
    if curve:
        strengths = ", ".join(f"{m:.3g}" for m in curve["mu"])
        mu_star = "-" if curve["mu_star"] is None else f"{curve['mu_star']:.4g}"
        lines.append(f"strength curve (mu* = {mu_star}; mu: {strengths}):")
        for name, values in curve["metrics"].items():
            if "/" in name or name not in curve["best"]:
                continue
            scale = 100.0 if is_fraction(name) else 1.0
            points = " ".join(_fmt(v, scale).strip() for v in values)
            best = curve["best"][name]
            lines.append(f"  {name:<10} {points}   best mu {best['mu']:.3g}")
    lines += _estimate_lines(payload)
    if payload.get("model", {}).get("name_or_path", "").startswith("svdecode-tiny"):
        lines.append("(a tiny model built in code: the effect of steering is near zero here; see README)")
    return "\n".join(lines)
