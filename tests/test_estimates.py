"""Strength estimates: every mode's estimates recorded in results.json with the test metrics at
each, from the same pass as both modes' test curves; each candidate scored once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.evaluation import evaluator
from svdecode_pl.evaluation.items import GenerationItem
from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.steering.strength import ESTIMATES, Candidate
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> dict:
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.name_or_path", "svdecode-tiny",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--data.synthetic_questions", "40", "--data.eval_batch_size", "8", *extra]
    run_cli(["fit", *common, "--trainer.max_steps", "3"])
    run_cli(["test", *common, "--model.adapter_path", str(tmp_path / "adapter")])
    return json.loads((tmp_path / "results.json").read_text())


def test_each_candidate_is_scored_once(monkeypatch):
    """A candidate on a curve or equal to another shares its column, a static candidate needs the
    direction, and a generation task decodes each distinct candidate once, the steered one included."""
    settings = EvaluationSettings()
    curves = {"static": [-10.0, 0.0, 10.0], "dynamic": [-10.0, 0.0]}
    extra = [Candidate("static", -0.4), Candidate("static", -0.4), Candidate("dynamic", -10.0)]
    settings = settings.with_steering(SteeringVector(torch.ones(4), -10.0), curves, extra)
    grid = settings.steering.grid
    assert grid == [Candidate("static", -10.0), Candidate("static", 0.0), Candidate("static", 10.0),
                    Candidate("dynamic", -10.0), Candidate("dynamic", 0.0), Candidate("static", -0.4)]
    assert settings.steering.column(Candidate("dynamic", -10.0)) == 3
    assert settings.steering.column(Candidate("dynamic", 5.0)) is None
    dynamic = SteeringVector(None, -1.0, "dynamic", metadata={"vocab_size": 4})
    dynamic_only = EvaluationSettings().with_steering(dynamic, curves, extra)
    assert dynamic_only.steering.grid == [Candidate("dynamic", -10.0), Candidate("dynamic", 0.0)]

    decoded = []

    def generate_texts(model, tokenizer, prompts, generation, vector=None):
        decoded.append(None if vector is None else (vector.mode, vector.mu))
        return ["text"] * len(prompts)

    monkeypatch.setattr(evaluator, "generate_texts", generate_texts)
    monkeypatch.setattr(evaluator, "generation_record", lambda item, texts, grid: grid)
    items = [GenerationItem(uid=i, id=str(i), context_ids=[1, 2]) for i in range(2)]
    grids = evaluator.Evaluator(None, object(), settings).generate(items)
    # plain, steered (static -10, also the first column), then the five other candidates
    assert decoded == [None, ("static", -10.0), ("static", 0.0), ("static", 10.0), ("dynamic", -10.0),
                       ("dynamic", 0.0), ("static", -0.4)]
    assert [len(grid) for grid in grids] == [6, 6]


def test_every_estimate_is_recorded_with_its_test_metrics(tmp_path):
    results = _run(tmp_path, "--steering.mu_grid", "[-3.0, 0.0, 1.0]", "--steering.mu_grid_relative", "true")
    steering = results["steering"]
    estimates = steering["estimates"]
    assert list(estimates) == ["static", "dynamic"]
    for mode, curve in results["test_curves"].items():
        assert list(estimates[mode]) == list(ESTIMATES)
        assert all(isinstance(e["mu"], float) for e in estimates[mode].values())
        mu_star = estimates[mode]["mu_star"]["mu"]
        assert curve["mu"] == pytest.approx([-3 * mu_star, 0.0, mu_star])
        # the paper's mu* scored as an estimate equals the curve's own point at 1 x mu*; 0 is plain
        for name in ("mc1", "mc2", "mc3"):
            assert estimates[mode]["mu_star"]["metrics"][name] == pytest.approx(curve["metrics"][name][2])
            assert curve["metrics"][name][1] == pytest.approx(results["metrics"][name]["plain"])
    choice = steering["choice"]
    assert choice["rule"] == "validation" and choice["selection_metric"] == "mean(mc1, mc2)"
    assert set(choice["validation_gain"]) == {"estimate", "low", "high", "level"}
    assert set(choice["validation_curves"]) == {"static", "dynamic"}
    assert (steering["mode"], steering["mu"]) == (choice["mode"], choice["mu"])
    if steering["mu"] != 0.0:  # the run steers at the chosen candidate: its steered metrics are its curve point
        curve = results["test_curves"][steering["mode"]]
        index = curve["mu"].index(steering["mu"])
        assert results["metrics"]["mc2"]["steered"] == pytest.approx(curve["metrics"]["mc2"][index])
    for name, difference in results["test_difference"].items():
        metrics = results["metrics"][name]
        assert difference["estimate"] == pytest.approx(metrics["steered"] - metrics["plain"])
        assert difference["low"] <= difference["estimate"] <= difference["high"] and difference["level"] == 0.95


def test_without_a_validation_split_the_default_steers_off_and_mu_star_is_explicit(tmp_path):
    results = _run(tmp_path, "--data.val_fraction", "0.0")
    steering = results["steering"]
    for mode in ("static", "dynamic"):
        assert steering["estimates"][mode]["mu_star_heldout"] == {"mu": None, "metrics": None}
    assert steering["mu"] == 0.0 and steering["choice"]["guard_passed"] is False
    assert steering["choice"]["reason"].startswith("no validation split")
    for values in results["metrics"].values():
        assert values["steered"] == values["plain"]
    explicit = _run(tmp_path / "explicit", "--data.val_fraction", "0.0", "--steering.strength", "mu_star")
    steering = explicit["steering"]
    assert (steering["mode"], steering["choice"]["rule"]) == ("static", "mu_star")
    assert steering["mu"] == pytest.approx(steering["estimates"]["static"]["mu_star"]["mu"])
    assert steering["choice"]["guard_passed"] is None and steering["choice"]["validation_gain"] is None


def test_report_curve_is_symlog_and_marks_every_estimate(tmp_path, monkeypatch):
    from svdecode_pl.results import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figures.append(fig) or path)
    grid = [-100.0, -1.0, -0.1, 0.0, 0.1, 1.0, 100.0]
    curves = {"static": {"mu": grid, "metrics": {"mc1": [0.8, 0.75, 0.73, 0.73, 0.73, 0.72, 0.5]}},
              "dynamic": {"mu": grid, "metrics": {"mc1": [0.6, 0.74, 0.73, 0.73, 0.73, 0.72, 0.5]}}}
    estimates = {"static": {"mu_star": {"mu": -0.18}, "mu_star_heldout": {"mu": -0.4},
                            "mu_star_filtered": {"mu": None}},
                 "dynamic": {"mu_star": {"mu": -0.3}, "mu_star_heldout": {"mu": None},
                             "mu_star_filtered": {"mu": None}}}
    results = {"task": "truthfulqa_mc", "test_curves": curves,
               "steering": {"mode": "static", "mu": -100.0, "estimates": estimates}}
    run = report.Run(tmp_path, "mini", results)
    report.mu_curve_figure(run, tmp_path)
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "symlog"
    vertical = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) == 2]
    marked = sorted(float(x[0]) for x in vertical if x[0] == x[1])
    assert marked == sorted([-0.18, -0.4, -0.3])  # every estimate that has a value, the paper's included
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(-100.0, 80.0)]  # the steered point
    assert len([line for line in ax.lines if len(line.get_xdata()) == len(grid)]) == 2  # both modes' curves
