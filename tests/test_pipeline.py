"""The whole pipeline through the `svdecode` CLI: fit, steering at fit end, test, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_run_args
from peft import PeftModel

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run(*args: str):
    return run_cli([*args])


def small(run_dir: Path, *extra: str) -> list[str]:
    return small_run_args(QUICKSTART, run_dir, 24, *extra)


def check_results(run_dir: Path, steered: bool) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "truthfulqa_mc" and results["n_examples"] == 12
    for name in ("mc1", "mc2", "mc3"):
        values = results["metrics"][name]
        assert 0.0 <= values["plain"] <= 1.0
        assert (values["steered"] is not None) == steered
    if steered:
        assert set(results["steering"]) >= {"mode", "mu", "confidence_threshold"}
    else:
        assert results["steering"] is None
    return results


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "ia3", "prompt_tuning", "p_tuning_v2"])
def test_fit_extract_test_every_adapter(tmp_path, adapter):
    args = small(tmp_path, "--config", str(ROOT / "configs" / "peft" / f"{adapter}.yaml"))
    run("fit", *args, "--trainer.max_steps", "4")
    vector = SteeringVector.load(tmp_path / "steering")
    assert vector.mode == "static" and vector.metadata["token_count"] > 0
    assert torch.isfinite(vector.direction).all() and vector.direction.abs().sum() > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    # the adapter is in PEFT's standard format
    loaded = PeftModel.from_pretrained(load_causal_lm("svdecode-tiny"), str(tmp_path / "adapter"))
    expected = {"lora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING", "p_tuning_v2": "PREFIX_TUNING"}
    assert loaded.peft_config["default"].peft_type.value == expected[adapter]
    # ... and one artifact with its vector (issue 19): PEFT loaded it above as a plain adapter
    shared = SteeringVector.load(tmp_path / "adapter" / "steering")
    assert torch.equal(shared.direction, vector.direction) and shared.mu == vector.mu
    assert (tmp_path / "adapter" / "custom_generate" / "generate.py").is_file()
    run("test", *args, "--model.adapter_path", str(tmp_path / "adapter"))
    check_results(tmp_path, steered=True)


@pytest.mark.slow
def test_dynamic_mode_and_predict_records(tmp_path):
    args = small(tmp_path, "--steering.mode", "dynamic")
    run("fit", *args, "--trainer.max_steps", "3")
    vector = SteeringVector.load(tmp_path / "steering")
    # a format-2 vector keeps the static direction beside the dynamic mode, so both can be scored
    assert vector.mode == "dynamic" and vector.modes == ("static", "dynamic")
    run("test", *args, "--model.adapter_path", str(tmp_path / "adapter"))
    results = check_results(tmp_path, steered=True)
    assert results["steering"]["mode"] == "dynamic"
    run("predict", *args, "--model.adapter_path", str(tmp_path / "adapter"),
        "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter")
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and [r["uid"] for r in records] == sorted(r["uid"] for r in records)
    first = records[0]
    assert len(first["scores"]["plain"]) == len(first["answers"]) == len(first["scores"]["steered"])
    assert first["choice"]["plain"] in first["answers"]


@pytest.mark.slow
def test_no_adapter_no_steering(tmp_path):
    run("test", *small(tmp_path, "--config", str(ROOT / "configs" / "peft" / "none.yaml")))
    check_results(tmp_path, steered=False)


@pytest.mark.slow
def test_mismatched_steering_vector_is_refused(tmp_path):
    SteeringVector(torch.randn(5), 1.0, metadata={"vocab_size": 5}).save(tmp_path / "steering")
    with pytest.raises(ValueError, match=r"steering_vector.json: field 'vocab_size': 5, but the model has"):
        run("test", *small(tmp_path))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_resume_from_last_checkpoint(tmp_path):
    args = small(tmp_path)
    run("fit", *args, "--trainer.max_steps", "2")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 2
    assert all("lora_" in key for key in state["state_dict"])  # only what is trainable
    cli = run("fit", *args, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt))
    assert cli.trainer.global_step == 4


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_mu_curve_point_at_mu_star_equals_a_fixed_mu_run(tmp_path, mode):
    """The test curves score every question at every (mode, mu) from one forward pass; a mode's
    point at mu* equals the steered metrics of a run with that mode and mu fixed to mu* (a loaded
    vector re-chosen at test: ``--steering.strength <number>``), its point at 0 the plain ones."""
    run(*["fit", *small(tmp_path, "--trainer.max_steps", "3", "--steering.mode", mode)])
    adapter = ["--model.adapter_path", str(tmp_path / "adapter")]
    grid = ["--steering.mu_grid", "[0.0, 1.0, 5.0]", "--steering.mu_grid_relative", "true"]
    run(*["test", *small(tmp_path, *grid, *adapter)])
    curve_run = json.loads((tmp_path / "results.json").read_text())
    assert set(curve_run["test_curves"]) == {"static", "dynamic"}  # both modes, whichever was pinned
    curve = curve_run["test_curves"][mode]
    mu_star = curve_run["steering"]["estimates"][mode]["mu_star"]["mu"]
    assert curve["mu"] == pytest.approx([0.0, mu_star, 5 * mu_star])
    fixed = tmp_path / "fixed"
    (fixed / "steering").mkdir(parents=True)
    for artifact in (tmp_path / "steering").iterdir():
        (fixed / "steering" / artifact.name).write_bytes(artifact.read_bytes())
    run(*["test", *small(fixed, "--steering.mode", mode, "--steering.strength", repr(mu_star), *adapter)])
    fixed_run = json.loads((fixed / "results.json").read_text())
    assert (fixed_run["steering"]["mode"], fixed_run["steering"]["mu"]) == (mode, pytest.approx(mu_star))
    assert fixed_run["steering"]["choice"]["rule"] == "fixed"
    for name in ("mc1", "mc2", "mc3"):
        assert curve["metrics"][name][1] == pytest.approx(fixed_run["metrics"][name]["steered"], abs=1e-6)
        assert curve["metrics"][name][0] == pytest.approx(curve_run["metrics"][name]["plain"], abs=1e-6)
