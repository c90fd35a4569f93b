"""The strength choice (issue 26): the one "best" rule, the significance guard, the simultaneous
band, the mode chosen with the strength, and the artifact that carries the record.

The guard tests construct per-question validation and test metrics (the guard sees what the
validation pass hands it: per-question metrics plain and at each candidate), so each property is
exact; the mode test runs the pipeline on a miniature cell where only dynamic steering helps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdecode_pl.metrics.bootstrap import paired_bootstrap, simultaneous_band
from svdecode_pl.steering.strength import (
    MIN_GAIN,
    STEERING_OFF,
    Candidate,
    ModeEstimates,
    SelectionMetric,
    StrengthChoice,
    ValidationScores,
    absolute_grid,
    best_index,
    choose,
    choose_by_rule,
    confirm,
    describe,
    grid_candidates,
)
from svdecode_pl.steering.vector import FORMAT_VERSION, SteeringVector

ROOT = Path(__file__).resolve().parents[1]
MC = SelectionMetric(("mc1", "mc2"), ("mc1", "mc2", "mc3"))
GRID = [-1000.0, -300.0, -100.0, -30.0, -10.0, -3.0, -1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0,
        100.0, 300.0, 1000.0]
CANDIDATES = grid_candidates(GRID, False, {}, ("static", "dynamic"))
ESTIMATES = {"static": ModeEstimates(-0.4, -0.5, -0.41), "dynamic": ModeEstimates(-0.35, None, -0.36)}


def scores(gains: dict[Candidate, torch.Tensor], n: int, seed: int = 0, noise: float = 0.0,
           mc1_gains: dict[Candidate, torch.Tensor] | None = None) -> ValidationScores:
    """Per-question MC metrics: plain MC1/MC2/MC3 drawn at random; each candidate's MC1 and MC2 moved
    by its per-question gain (``gains``: the selection metric's, mean(MC1, MC2)), other candidates by
    small noise; ``mc1_gains`` splits a candidate's gain between MC1 and MC2 instead."""
    generator = torch.Generator().manual_seed(seed)
    plain = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    values = plain[:, None, :].repeat(1, len(CANDIDATES), 1)
    for k, candidate in enumerate(CANDIDATES):
        if candidate.mu == 0.0:
            continue
        gain = gains.get(candidate, noise * torch.randn(n, generator=generator, dtype=torch.float64))
        mc1 = (mc1_gains or {}).get(candidate, gain)
        values[:, k, 0] += mc1
        values[:, k, 1] += 2 * gain - mc1  # mean(MC1, MC2) moves by ``gain``
        values[:, k, 2] += mc1
    return ValidationScores(["mc1", "mc2", "mc3"], CANDIDATES, plain, values)


def signs(plus: int, minus: int, n: int) -> torch.Tensor:
    """Per-question gains: +1 on ``plus`` questions, -1 on ``minus``, 0 on the rest."""
    return torch.tensor([1.0] * plus + [-1.0] * minus + [0.0] * (n - plus - minus), dtype=torch.float64)


# -- the one "best" rule ------------------------------------------------------------------------------
def test_best_index_takes_the_maximum_then_the_smallest_mu_then_static():
    c = [Candidate("dynamic", -10.0), Candidate("static", -10.0), Candidate("static", 0.0), Candidate("dynamic", 1.0)]
    assert best_index(c, [0.5, 0.4, 0.3, 0.2]) == 0
    assert best_index(c, [0.5, 0.5, 0.2, 0.2]) == 1  # equal |mu|: static
    assert best_index(c, [0.5, 0.5, 0.5, 0.5]) == 2  # a flat curve keeps the warm-started model
    assert best_index(c, [0.5, 0.5 + 1e-9, 0.2, None]) == 1  # rounding noise is no difference
    assert best_index(c, [None, float("nan"), None, None]) is None


def test_grid_to_absolute_strengths_per_mode():
    assert absolute_grid([0.0, 1.0, 2.0], True, -0.5) == [0.0, -0.5, -1.0]
    assert absolute_grid([0.0, 1.0, 2.0], False, -0.5) == [0.0, 1.0, 2.0]
    assert absolute_grid([1.0], True, None) == []
    candidates = grid_candidates([0.0, 1.0], True, ESTIMATES, ("static", "dynamic"))
    assert candidates == [Candidate("static", 0.0), Candidate("static", -0.4), Candidate("dynamic", 0.0),
                          Candidate("dynamic", -0.35)]


# -- the bootstrap --------------------------------------------------------------------------------------
def test_bootstrap_does_not_depend_on_the_thread_count():
    differences = torch.randn(300, 38, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            results.append((simultaneous_band(differences), paired_bootstrap(differences[:, 3])))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]  # bit for bit: frozen dataclasses of floats


def test_the_simultaneous_band_is_wider_than_one_candidates_interval():
    """The winner's curse: among 38 candidates that help nobody, the best one's own 95% interval
    excludes 0 here, the simultaneous band does not."""
    differences = torch.randn(100, 38, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    best = int(differences.mean(0).argmax())
    alone = paired_bootstrap(differences[:, best])
    band = simultaneous_band(differences)[best]
    assert alone.low > 0.0 and band.low < 0.0
    assert band.high - band.low > 1.3 * (alone.high - alone.low)
    assert band.estimate == pytest.approx(alone.estimate)


# -- the guard ------------------------------------------------------------------------------------------
def test_guard_steers_off_where_validation_favours_a_strength_that_test_does_not():
    """A validation split that favours static mu=-1000 by chance (12 questions gain, 9 lose), a test
    split on which that strength hurts (the counts reversed). best_index alone would steer at it; the
    guarded default steers at 0 and says so in one line."""
    n, favoured = 60, Candidate("static", -1000.0)
    validation = scores({favoured: signs(12, 9, n)}, n, noise=0.05)
    test = scores({favoured: signs(9, 12, n)}, n, seed=1, noise=0.05)
    gains = validation.differences(MC.metrics, list(range(len(CANDIDATES)))).mean(0).tolist()
    unguarded = CANDIDATES[best_index(CANDIDATES, gains)]
    assert unguarded == favoured
    assert test.differences(MC.metrics, test.columns([favoured])).mean() < 0  # it hurts on test
    choice = choose("validation", validation, MC, CANDIDATES, ESTIMATES, None)
    assert (choice.mu, choice.guard_passed) == (0.0, False)
    assert choice.validation_gain.estimate == pytest.approx(0.05) and choice.validation_gain.low < 0
    assert "static mu=-1000" in choice.reason and "not significant" in choice.reason
    assert describe(choice) == STEERING_OFF


def test_guard_lets_a_real_gain_through():
    n, helpful = 60, Candidate("dynamic", -30.0)
    choice = choose("validation", scores({helpful: signs(30, 2, n)}, n, noise=0.05), MC, CANDIDATES, ESTIMATES, None)
    assert choice.candidate == helpful and choice.guard_passed
    assert choice.validation_gain.low > 0 and choice.validation_gain.level == 0.95
    assert describe(choice).startswith("steering at dynamic mu=-30 (validation rule)")


def test_guard_uses_the_simultaneous_band_not_the_winners_own_interval():
    """A gain whose own 95% interval excludes 0 but which is no better than the best of 38 null
    candidates would be by chance: steering off."""
    n, lucky = 100, Candidate("static", 3.0)
    gain = signs(16, 6, n)
    validation = scores({lucky: gain}, n, noise=0.02)
    assert paired_bootstrap(gain).low > 0.0  # alone it would pass
    choice = choose("validation", validation, MC, CANDIDATES, ESTIMATES, None)
    assert choice.mu == 0.0 and not choice.guard_passed


def test_guard_refuses_a_significant_gain_below_the_minimum_practical_gain():
    """svdecode-mini-garden at 80 steps: validation MC1 100% both ways, MC2 up a fraction of a point
    on every question (significant), test MC1 down 2 points. Below one point the default steers
    off; a user's lower floor lets the same gain through."""
    n, tiny = 100, Candidate("static", -100.0)
    validation = scores({tiny: torch.full((n,), 0.004, dtype=torch.float64)}, n, noise=0.0001)
    choice = choose("validation", validation, MC, CANDIDATES, ESTIMATES, None)
    assert choice.validation_gain.low > 0 and choice.validation_gain.estimate < MIN_GAIN == 0.01
    assert (choice.mu, choice.guard_passed, choice.min_gain) == (0.0, False, MIN_GAIN)
    assert "below the minimum practical gain of 1.00 points" in choice.reason
    lower = choose("validation", validation, MC, CANDIDATES, ESTIMATES, None, min_gain=0.001)
    assert (lower.candidate, lower.guard_passed, lower.min_gain) == (tiny, True, 0.001)
    assert StrengthChoice.from_dict(choice.to_dict()) == choice


def test_a_candidate_that_lets_mc1_fall_on_validation_is_not_eligible():
    """svdecode-mini-kitchen at 20 steps, seed 1: dynamic mu=-3 won mean(MC1, MC2) on validation
    (+3.89 points, significant) with MC1 down 1 point there (not significantly), and test MC1 fell
    8.5 points. A candidate under which any reported metric falls on validation is not eligible: the
    best eligible one is steered at, and the one passed over is named; with none, steering off."""
    n, greedy, modest = 80, Candidate("static", -300.0), Candidate("dynamic", -1.0)
    mc1 = -signs(3, 0, n)  # 3 questions lose their top answer: not significant alone
    assert paired_bootstrap(mc1).high >= 0.0  # a significance-only check would let it through
    gains = {greedy: signs(60, 0, n) * 0.5, modest: signs(30, 0, n) * 0.5}
    validation = scores(gains, n, mc1_gains={greedy: mc1}, noise=0.01)
    choice = choose("validation", validation, MC, CANDIDATES, ESTIMATES, None)
    assert (choice.candidate, choice.guard_passed) == (modest, True)
    assert "static mu=-300 gained more (+37.50 points) but mc1 -3.75 points on validation" in choice.reason
    alone = scores({greedy: gains[greedy]}, n, mc1_gains={greedy: mc1}, noise=0.01)
    off = choose("validation", alone, MC, CANDIDATES, ESTIMATES, None)
    assert (off.mu, off.guard_passed) == (0.0, False) and "but mc1 -3.75 points" in off.reason


# -- the mode, chosen with the strength -----------------------------------------------------------------
def test_mode_is_chosen_with_the_strength_and_a_pinned_mode_holds():
    n, helpful = 60, Candidate("dynamic", -10.0)
    validation = scores({helpful: signs(30, 0, n)}, n, noise=0.05)
    assert choose("validation", validation, MC, CANDIDATES, ESTIMATES, None).candidate == helpful
    static = [c for c in CANDIDATES if c.mode == "static"]
    pinned = choose("validation", validation, MC, static, ESTIMATES, "static")
    assert (pinned.mode, pinned.mu) == ("static", 0.0)


def test_explicit_rules_steer_where_asked_with_mu_scale_once():
    choice = choose_by_rule("mu_star", None, MC, ESTIMATES, ("static", "dynamic"), mu_scale=2.0)
    assert choice.candidate == Candidate("static", -0.8) and choice.guard_passed is None
    heldout = choose_by_rule("mu_star_heldout", None, MC, ESTIMATES, ("dynamic",))
    assert (heldout.rule, heldout.mu) == ("mu_star", -0.35)  # no held-out value in this mode: the paper's
    fixed = choose_by_rule(-3.0, None, MC, ESTIMATES, ("dynamic",))
    assert (fixed.rule, fixed.candidate) == ("fixed", Candidate("dynamic", -3.0))


# -- the artifact ---------------------------------------------------------------------------------------
def test_the_vector_carries_the_record_through_save_and_load(tmp_path):
    choice = choose("validation", scores({Candidate("dynamic", -10.0): signs(30, 0, 60)}, 60, noise=0.05), MC,
                    CANDIDATES, ESTIMATES, None)
    vector = SteeringVector(torch.randn(7), -0.4, metadata={"vocab_size": 7}).chosen(choice)
    assert (vector.mode, vector.mu, vector.direction is not None) == ("dynamic", -10.0, True)
    loaded = SteeringVector.load(vector.save(tmp_path / "steering"))
    meta = json.loads((tmp_path / "steering" / "steering_vector.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["strength_choice"]["rule"] == "validation"
    assert loaded.choice == choice and torch.equal(loaded.direction, vector.direction)
    assert loaded.modes == ("static", "dynamic") and list(loaded.choice.estimates) == ["static", "dynamic"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_format_1_artifact_still_loads(tmp_path, mode):
    """Written before the record: loose metadata keys, no format_version, a dynamic vector without
    its direction."""
    path = tmp_path / "steering"
    SteeringVector(torch.randn(5), -300.0, metadata={"vocab_size": 5}).save(path)
    if mode == "dynamic":
        (path / "steering_vector.safetensors").unlink()
    metadata = {"vocab_size": 5, "mu_star": -0.4, "mu_scale": 1.0, "strength": "validation_best",
                "estimates": {"mu_star": -0.4, "mu_star_heldout": -0.48, "mu_star_filtered": -0.41,
                              "validation_best": -300.0}}
    (path / "steering_vector.json").write_text(json.dumps(
        {"mode": mode, "mu": -300.0, "confidence_threshold": 0.0, "metadata": metadata}))
    vector = SteeringVector.load(path)
    assert (vector.mode, vector.mu) == (mode, -300.0)
    assert vector.modes == (("static", "dynamic") if mode == "static" else ("dynamic",))
    choice = vector.choice
    assert (choice.rule, choice.mode, choice.mu, choice.guard_passed) == ("validation", mode, -300.0, None)
    assert choice.estimates == {mode: ModeEstimates(-0.4, -0.48, -0.41)}
    assert StrengthChoice.from_dict(choice.to_dict()) == choice


@pytest.mark.slow
def test_on_a_miniature_cell_where_only_dynamic_helps_the_default_picks_dynamic(tmp_path, monkeypatch):
    """svdecode-mini-gadgets (a tuning member of the family), the quickstart's settings at 80
    warm-start steps, seed 0: the adapter already answers most questions (plain test MC1 85.5), no
    static strength of the grid raises MC1 on test, and static alone does not pass the guard on
    validation; dynamic mu = -10 lifts test MC1 to 98. The default (mode null) picks dynamic."""
    from svdecode_pl.cli.entry import run_cli
    from svdecode_pl.recipes.callbacks import steering as steering_callback
    from svdecode_pl.tasks.truthfulqa_mc import MC_SELECTION

    captured = []
    passes = steering_callback.validation_scores
    monkeypatch.setattr(steering_callback, "validation_scores", lambda *args: captured.append(passes(*args)) or
                        captured[-1])
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--config",
              str(ROOT / "configs" / "family" / "svdecode-mini-gadgets.yaml"), "--trainer.default_root_dir",
              str(tmp_path), "--seed_everything", "0", "--trainer.max_steps", "80", "--trainer.callbacks", "[]",
              "--trainer.enable_progress_bar", "false"]
    run_cli(["fit", *common])
    run_cli(["test", *common, "--model.adapter_path", str(tmp_path / "adapter")])
    results = json.loads((tmp_path / "results.json").read_text())
    steering = results["steering"]
    assert steering["mode"] == "dynamic" and steering["mu"] != 0.0 and steering["choice"]["guard_passed"]
    scores = captured[0]
    static = [c for c in scores.candidates if c.mode == "static"]
    assert len(static) == len(GRID) and choose("validation", scores, MC_SELECTION, static, {}, "static").mu == 0.0
    assert results["test_difference"]["mc1"]["low"] > 0.0  # the chosen dynamic strength helps on test
    plain = results["metrics"]["mc1"]["plain"]
    assert max(results["test_curves"]["static"]["metrics"]["mc1"]) <= plain + 0.01  # no static strength does


def test_a_choice_on_reference_answers_is_confirmed_on_decoded_text():
    """Generation: a candidate chosen on the reference answers' likelihood is decoded once; a decoded
    metric that falls significantly steers off, one that holds keeps the choice."""
    n, chosen = 60, Candidate("static", -100.0)
    choice = choose("validation", scores({chosen: signs(30, 0, n)}, n, noise=0.05), MC, CANDIDATES, ESTIMATES, None)
    assert choice.candidate == chosen and choice.guard_passed
    plain = torch.rand(n, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    falls = torch.stack([plain[:, 0] - signs(20, 2, n), plain[:, 1]], -1)[:, None, :]
    decoded = ValidationScores(["bleu_acc", "rougeL_acc"], [chosen], plain, falls)
    off = confirm(choice, decoded, None)
    assert (off.mode, off.mu, off.guard_passed) == ("static", 0.0, False)
    assert "decoded bleu_acc falls significantly" in off.reason and describe(off) == STEERING_OFF
    holds = ValidationScores(["bleu_acc", "rougeL_acc"], [chosen], plain, plain[:, None, :] + 0.01)
    assert confirm(choice, holds, None) == choice


@pytest.mark.slow
def test_on_a_generation_cell_where_the_references_mislead_the_default_steers_off(tmp_path):
    """TruthfulQA generation on svdecode-mini (tuning), the generation quickstart, seed 2: the
    reference answers favour static mu = -100 significantly (mean(MC1, MC2) +15.6 points on
    validation), but decoded at that strength the answers lose BLEU/ROUGE (decoded mean(BLEU acc,
    ROUGE-L acc) -37 points on validation, benchmarks/generation_selection.py): the decoding check
    steers off."""
    from svdecode_pl.cli.entry import run_cli

    run_cli(["fit", "--config", str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"),
             "--trainer.default_root_dir", str(tmp_path), "--seed_everything", "2", "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false"])
    choice = SteeringVector.load(tmp_path / "steering").choice
    assert choice.reason.startswith("static mu=-100: mean(mc1, mc2) gain") and choice.validation_gain.low > 0
    assert (choice.mu, choice.guard_passed) == (0.0, False) and "but decoded" in choice.reason
