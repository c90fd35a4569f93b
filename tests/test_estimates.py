"""Strength estimates: the validation choice on a curve, and every estimate recorded in
results.json with the test metrics at it (from the same pass as the strength curve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.evaluation import evaluator
from svdecode_pl.evaluation.items import GenerationItem
from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.steering.estimates import ESTIMATES, best_on_curve, chosen_strength
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


def test_best_on_curve_takes_the_maximum_and_breaks_ties_towards_zero():
    assert best_on_curve([-10.0, 0.0, 10.0], [0.5, 0.4, 0.3]) == -10.0
    assert best_on_curve([-10.0, -1.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.2]) == 0.0
    # rounding noise is no difference: a flat curve keeps the warm-started model
    assert best_on_curve([-100.0, 0.0, 100.0], [0.5, 0.5, 0.5 + 1e-9]) == 0.0
    assert best_on_curve([1.0, 2.0], [None, None]) is None


def test_chosen_strength_falls_back_to_the_papers_mu_star():
    assert chosen_strength({"mu_star": -0.2, "validation_best": None}, "validation_best") == ("mu_star", -0.2)
    assert chosen_strength({"mu_star": -0.2, "validation_best": -10.0}, "validation_best") == ("validation_best", -10.0)
    with pytest.raises(ValueError):
        chosen_strength({"mu_star": 0.0}, "oracle")


def _run(tmp_path: Path, *extra: str) -> dict:
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.name_or_path", "svdecode-tiny",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--data.synthetic_questions", "40", "--data.eval_batch_size", "8", *extra]
    run_cli(["fit", *common, "--trainer.max_steps", "3"])
    run_cli(["test", *common, "--model.adapter_path", str(tmp_path / "adapter")])
    return json.loads((tmp_path / "results.json").read_text())


def test_each_strength_is_scored_once(monkeypatch):
    """An estimate on the curve (validation_best always is) or equal to another shares its column,
    and a generation task decodes each distinct strength once, the steered one included."""
    settings = EvaluationSettings()
    estimates = {"mu_star": -0.4, "mu_star_heldout": -0.4, "validation_best": -10.0}
    settings.use_steering(SteeringVector(torch.ones(4), -10.0), [-10.0, 0.0, 10.0], estimates)
    assert settings.steering.grid == [-10.0, 0.0, 10.0, -0.4]
    assert settings.steering.estimate_columns() == {"mu_star": 3, "mu_star_heldout": 3, "validation_best": 0}

    decoded = []

    def generate_texts(model, tokenizer, prompts, generation, vector=None):
        decoded.append(None if vector is None else vector.mu)
        return ["text"] * len(prompts)

    monkeypatch.setattr(evaluator, "generate_texts", generate_texts)
    monkeypatch.setattr(evaluator, "generation_record", lambda item, texts, grid: grid)
    items = [GenerationItem(uid=i, id=str(i), context_ids=[1, 2]) for i in range(2)]
    grids = evaluator.Evaluator(None, object(), settings).generate(items)
    assert sorted(decoded, key=str) == sorted([None, -10.0, 0.0, 10.0, -0.4], key=str)  # plain, steered, 3 more
    assert [len(grid) for grid in grids] == [4, 4]


def test_every_estimate_is_recorded_with_its_test_metrics(tmp_path):
    results = _run(tmp_path, "--steering.mu_grid", "[-3.0, 0.0, 1.0]", "--steering.mu_grid_relative", "true")
    steering = results["steering"]
    estimates = steering["estimates"]
    assert list(estimates) == list(ESTIMATES)
    assert all(isinstance(e["mu"], float) for e in estimates.values())
    assert estimates["mu_star"]["mu"] == pytest.approx(steering["mu_star"])
    assert estimates["validation_best"]["mu"] in results["mu_curve"]["mu"]
    assert steering["validation_curve"]["metric"] == "mc2"
    # the paper's mu* scored after the curve equals the curve's own point at 1 x mu*
    for name in ("mc1", "mc2", "mc3"):
        assert estimates["mu_star"]["metrics"][name] == pytest.approx(results["mu_curve"]["metrics"][name][2])
    # the run steers at the chosen estimate: its steered metrics are that estimate's
    chosen = estimates[steering["strength"]]
    assert steering["mu"] == pytest.approx(chosen["mu"])
    assert results["metrics"]["mc2"]["steered"] == pytest.approx(chosen["metrics"]["mc2"])


def test_without_a_validation_split_the_held_out_estimates_are_null(tmp_path):
    results = _run(tmp_path, "--data.val_fraction", "0.0")
    estimates = results["steering"]["estimates"]
    assert estimates["mu_star_heldout"] == {"mu": None, "metrics": None}
    assert estimates["validation_best"] == {"mu": None, "metrics": None}
    assert results["steering"]["strength"] == "mu_star"
    assert results["steering"]["mu"] == pytest.approx(results["steering"]["mu_star"])


def test_report_curve_is_symlog_and_marks_every_estimate(tmp_path, monkeypatch):
    from svdecode_pl.results import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figures.append(fig) or path)
    grid = [-100.0, -1.0, -0.1, 0.0, 0.1, 1.0, 100.0]
    curve = {"mu": grid, "mu_star": -0.18, "metrics": {"mc1": [0.8, 0.75, 0.73, 0.73, 0.73, 0.72, 0.5]},
             "best": {"mc1": {"mu": -100.0, "value": 0.8}}}
    estimates = {"mu_star": {"mu": -0.18}, "mu_star_heldout": {"mu": -0.4}, "mu_star_filtered": {"mu": None},
                 "validation_best": {"mu": -100.0}}
    results = {"task": "truthfulqa_mc", "mu_curve": curve, "steering": {"estimates": estimates}}
    run = report.Run(tmp_path, "mini", results)
    report.mu_curve_figure(run, tmp_path)
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "symlog"
    vertical = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) == 2]
    marked = sorted(float(x[0]) for x in vertical if x[0] == x[1])
    assert marked == sorted([-0.18, -0.4, -100.0])  # every estimate that has a value, the paper's included
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(-100.0, 80.0)]
