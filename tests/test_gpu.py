"""Checks that need an accelerator (issue 21, item 4): marked ``gpu``, skipped without CUDA.

``SVDECODE_TEST_DEVICE=cpu`` runs them on the CPU instead: ``benchmarks/device_check.py --dry-run``
uses it to check the script's own steps where no GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = {
    "Q: What is the capital of France?\nA:": [" Paris.", " Lyon, the capital.", " Berlin."],
    "Q: What happens if you crack your knuckles?\nA:": [" Nothing in particular.", " Arthritis."],
    "Q: Are all mammals vertebrates?\nA:": [" Yes.", " No, some are not."],
}


@pytest.fixture(scope="module")
def device() -> torch.device:
    name = os.environ.get("SVDECODE_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device (SVDECODE_TEST_DEVICE=cpu runs these on the CPU)")
    return torch.device(name)


def _model(device: torch.device, dtype: torch.dtype):
    """The tiny Qwen2 with a non-zero LoRA adapter, on ``device`` in ``dtype``."""
    from peft import LoraConfig, get_peft_model

    from svdecode_pl.models.loading import load_causal_lm, load_tokenizer, resolve_name_or_path

    path = resolve_name_or_path("svdecode-tiny")
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(load_causal_lm(path), config).to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(path)


def _scores(model, tok, max_batch_tokens: int = 0):
    from svdecode_pl.evaluation.scoring import score_many
    from svdecode_pl.models.heads import output_vocab_size
    from svdecode_pl.steering.vector import SteeringVector

    contexts = [tok(q)["input_ids"] for q in QUESTIONS]
    continuations = [[tok(a)["input_ids"] for a in answers] for answers in QUESTIONS.values()]
    vector = SteeringVector(None, 2.0, mode="dynamic", metadata={"vocab_size": output_vocab_size(model)})
    return score_many(model, contexts, continuations, vector, max_batch_tokens=max_batch_tokens)


def test_bf16_scores_are_close_to_float32(device) -> None:
    """Answer log-likelihoods in bfloat16 within 4 bf16 ulps (relative 2^-6) of float32: bf16 keeps
    8 significant bits, so each logit is off by up to 2^-8 relative; a few layers and the log-softmax
    compound this to a few ulps (observed on CPU: 0.0016 relative at scores ~-175)."""
    full, tok = _model(device, torch.float32)
    half, _ = _model(device, torch.bfloat16)
    for a, b in zip(_scores(full, tok), _scores(half, tok)):
        torch.testing.assert_close(b.plain.float().cpu(), a.plain.float().cpu(), rtol=2**-6, atol=0.05)
        torch.testing.assert_close(b.steered.float().cpu(), a.steered.float().cpu(), rtol=2**-6, atol=0.05)


def test_packed_and_padded_scores_agree(device) -> None:
    """Exact packing (the CPU default) and padded batches (the CUDA default) give the same scores."""
    model, tok = _model(device, torch.float32)
    for a, b in zip(_scores(model, tok, 0), _scores(model, tok, 4096)):
        torch.testing.assert_close(b.plain.cpu(), a.plain.cpu(), rtol=0, atol=1e-4)
        torch.testing.assert_close(b.steered.cpu(), a.steered.cpu(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_steered_generation_runs_and_differs_from_plain(device, mode) -> None:
    """Steered decoding on the device: batched tokens equal one-by-one tokens (left padding and the
    dynamic loop's two caches are right), and a strong static vector changes them (the processor acts)."""
    from svdecode_pl.evaluation.generation import GenerationSettings, generate_token_ids
    from svdecode_pl.models.heads import output_vocab_size
    from svdecode_pl.steering.vector import SteeringVector

    model, tok = _model(device, torch.float32)
    direction = torch.randn(output_vocab_size(model), generator=torch.Generator().manual_seed(1))
    vector = SteeringVector(direction, 5.0) if mode == "static" else SteeringVector(None, 50.0, mode="dynamic")
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=8, stop=[])
    batched = generate_token_ids(model, tok, prompts, settings, vector)
    single = [generate_token_ids(model, tok, [p], settings, vector)[0] for p in prompts]
    plain = generate_token_ids(model, tok, prompts, settings)
    assert batched == single
    if mode == "static":
        assert batched != plain


def test_deepspeed_zero2_warm_start(device, tmp_path) -> None:
    """`svdecode fit` under DeepSpeed ZeRO-2 on one device: trains, writes the adapter and the vector."""
    pytest.importorskip("deepspeed")
    strategy = "deepspeed_zero2.yaml" if device.type == "cuda" else "deepspeed_zero2_cpu.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device.type != "cuda":
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-c", "from svdecode_pl.cli import main; main()", "fit",
               "--config", str(ROOT / "configs" / "quickstart.yaml"),
               "--config", str(ROOT / "configs" / "strategy" / strategy),
               "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "3",
               "--trainer.enable_progress_bar", "false", "--data.synthetic_questions", "16"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert any((tmp_path / "steering").iterdir())
