"""bfloat16 end to end on the CPU (issue 21, item 1): fit, extraction, test and predict, static and
dynamic, with bfloat16 weights (``bf16-true``) and with float32 weights under ``bf16-mixed``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
BF16 = ("--model.dtype", "bfloat16", "--trainer.precision", "bf16-true")
FP32 = ("--model.dtype", "float32", "--trainer.precision", "32-true")
#: bf16 keeps 8 significant bits: a logit is off by up to 2^-8 relative, and two layers plus the
#: log-softmax compound that to a few ulps; 4 ulps relative (2^-6) bounds an answer's summed
#: log-likelihood (observed: ~2^-9), with 0.05 nats absolute for scores near 0.
RTOL, ATOL = 2**-6, 0.05


def small(run_dir: Path, *extra: str) -> list[str]:
    # svdecode-tiny: the model the tolerance above was reasoned on (bf16's error grows with the logits'
    # size, and the quickstart's pre-trained miniature has larger logits)
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(run_dir),
            "--model.name_or_path", "svdecode-tiny", "--steering.strength", "mu_star",
            "--trainer.enable_progress_bar", "false", "--data.synthetic_questions", "16",
            "--data.eval_batch_size", "4", *extra]


def predictions(run_dir: Path, *extra: str) -> list[dict]:
    run_cli(["predict", *small(run_dir, *extra), "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"])
    path = run_dir / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    return records


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_bf16_fit_extract_test_predict_close_to_float32(tmp_path, mode) -> None:
    """Statistics and mu* are float32/float64 whatever the weights; bf16 answer scores (plain and
    steered) are within RTOL/ATOL of the float32 run of the same adapter (see RTOL's comment); the
    dynamic steered score adds mu x (two rounded log-probabilities), so its bound is (1 + 2|mu|) times."""
    args = ("--steering.mode", mode)
    run_cli(["fit", *small(tmp_path, *args, *BF16, "--trainer.max_steps", "3")])
    vector = SteeringVector.load(tmp_path / "steering")
    assert isinstance(vector.mu, float) and math.isfinite(vector.mu) and vector.mu != 0.0
    if mode == "static":
        assert vector.direction.dtype == torch.float32 and bool(torch.isfinite(vector.direction).all())
    adapter = ("--model.adapter_path", str(tmp_path / "adapter"))
    run_cli(["test", *small(tmp_path, *args, *BF16, *adapter)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["mc2"]["steered"] is not None
    half = predictions(tmp_path, *args, *BF16, *adapter)
    full = predictions(tmp_path, *args, *FP32, *adapter)
    assert [r["uid"] for r in half] == [r["uid"] for r in full] and half
    # dynamic steering adds mu x (adapted - base log-probabilities): two more rounded terms, scaled by mu
    scale = {"plain": 1.0, "steered": 1.0 + (2 * abs(vector.mu) if mode == "dynamic" else 0.0)}
    for a, b in zip(full, half):
        for variant, factor in scale.items():
            torch.testing.assert_close(torch.tensor(b["scores"][variant]), torch.tensor(a["scores"][variant]),
                                       rtol=RTOL * factor, atol=ATOL * factor)


@pytest.mark.slow
def test_bf16_mixed_with_float32_weights(tmp_path) -> None:
    """bf16-mixed autocast over float32 weights trains and extracts a finite float32 vector."""
    run_cli(["fit", *small(tmp_path, "--model.dtype", "float32", "--trainer.precision", "bf16-mixed",
                           "--trainer.max_steps", "3")])
    vector = SteeringVector.load(tmp_path / "steering")
    assert vector.direction.dtype == torch.float32 and bool(torch.isfinite(vector.direction).all())
    assert math.isfinite(vector.mu) and vector.mu != 0.0
