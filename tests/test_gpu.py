"""Checks that need an accelerator (issues 21 and 25): marked ``gpu``, skipped without CUDA.

``SVDECODE_TEST_DEVICE=cpu`` runs them on the CPU instead: ``benchmarks/device_check.py --dry-run``
uses it to check the script's own steps where no GPU is lent.
"""

from __future__ import annotations

import json
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
    from svdecode_pl.models.heads import output_vocab_size
    from svdecode_pl.scoring.loglik import score_many
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
    from svdecode_pl.decoding.generation import GenerationSettings, generate_token_ids
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


#: the strategies a user's run on one GPU would use; on the CPU (the dry run) their CPU stand-ins
STRATEGIES = {
    "cuda": {"none": [], "ddp": ["--config", "ddp.yaml"], "zero2": ["--config", "deepspeed_zero2.yaml"],
             "zero3": ["--config", "deepspeed_zero3.yaml"]},
    "cpu": {"none": [], "ddp": ["--trainer.strategy", "ddp"], "zero2": ["--config", "deepspeed_zero2_cpu.yaml"],
            "zero3": ["--config", "deepspeed_zero3_cpu.yaml"]},
}


def _strategy_args(device: torch.device, name: str) -> list[str]:
    args = STRATEGIES[device.type][name]
    return [str(ROOT / "configs" / "strategy" / a) if a.endswith(".yaml") else a for a in args]


def test_every_strategy_fits_tests_and_predicts(device, tmp_path) -> None:
    """`svdecode fit` + `test` + `predict` on one device, static and dynamic, with no strategy, DDP
    (``ddp`` with one device: an NCCL group of one on a GPU, whose gathers refuse CPU tensors),
    DeepSpeed ZeRO-2 and ZeRO-3: the vector was extracted on the device (its metadata), written
    once into the run and the adapter, and `test` and `predict` read it. The four strategies' runs go
    on at once (each its six commands in turn), to fit the device check's time."""
    pytest.importorskip("deepspeed")
    from svdecode_pl.models.loading import resolve_name_or_path
    from svdecode_pl.steering.vector import SteeringVector

    resolve_name_or_path("svdecode-tiny")  # built once here, not by four processes at once
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device.type != "cuda":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    runs = {}
    for name in STRATEGIES[device.type]:
        log = (tmp_path / f"{name}.log").open("w")
        command = [sys.executable, str(ROOT / "tests" / "scripts" / "gpu_pipeline.py"), str(tmp_path / name),
                   device.type, *_strategy_args(device, name)]
        runs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=env)
    failed = {}
    for name, process in runs.items():
        try:
            process.wait(timeout=500)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        if process.returncode != 0:
            failed[name] = (tmp_path / f"{name}.log").read_text()[-3000:]
    assert not failed, "\n\n".join(f"== {name} (exit {runs[name].returncode}):\n{tail}"
                                    for name, tail in failed.items())
    for name in runs:
        for mode in ("static", "dynamic"):
            root = tmp_path / name / mode
            vector = SteeringVector.load(root / "steering")
            extraction = vector.metadata["extraction"]
            assert extraction["device"].startswith(device.type), (name, mode, extraction)
            assert extraction["calibration_seconds"] > 0 and extraction["processes"] == 1
            shared = SteeringVector.load(root / "adapter" / "steering")
            assert shared.metadata == vector.metadata and shared.mode == vector.mode == mode
            results = json.loads((root / "results.json").read_text())
            assert results["steering"]["mode"] == mode and results["steering"]["mu_star"] == vector.metadata["mu_star"]
            assert results["metrics"]["mc2"]["steered"] is not None, (name, mode)
            records = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
            assert len(records) == 6 and all(len(r["scores"]["steered"]) == len(r["answers"]) for r in records)


def test_compiled_decoding_equals_eager_and_replays(device) -> None:
    """Compiled decoding on the device (``reduce-overhead``: CUDA graphs; static caches): greedy
    tokens equal eager decoding's, plain and static on merged weights and dynamic in one pass, for a
    first batch and for a second batch of other prompt lengths, which replays the recorded graphs
    (the dynamic loop's cache is the same object); merged decoding leaves the weights as they were."""
    import dataclasses

    from svdecode_pl.decoding import compiled
    from svdecode_pl.decoding.generation import GenerationSettings, generate_token_ids
    from svdecode_pl.models.heads import hf_model, output_vocab_size
    from svdecode_pl.steering.vector import SteeringVector

    model, tok = _model(device, torch.float32)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    direction = torch.randn(output_vocab_size(model), generator=torch.Generator().manual_seed(1))
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    eager = GenerationSettings(max_new_tokens=16, stop=[], compile=False)
    on = dataclasses.replace(eager, compile=True)
    for vector in (None, SteeringVector(direction, 5.0), SteeringVector(None, 50.0, mode="dynamic")):
        for batch in (prompts, prompts[::-1]):
            assert generate_token_ids(model, tok, batch, on, vector) == generate_token_ids(model, tok, batch, eager,
                                                                                           vector)
        if vector is not None and vector.needs_base_logits:
            cache = compiled._held(hf_model(model).get_decoder())["mixed"]
            generate_token_ids(model, tok, prompts, on, vector)
            assert compiled._held(hf_model(model).get_decoder())["mixed"] is cache
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters())


def test_merged_weights_restored_from_host_copies(device, monkeypatch) -> None:
    """Where the weights' copies do not fit the device (forced here), they wait in pinned host
    memory: the same tokens, and the weights back bit for bit in their own storage."""
    from svdecode_pl.decoding import merged
    from svdecode_pl.decoding.generation import GenerationSettings, generate_token_ids

    model, tok = _model(device, torch.float32)
    weights = {name: (p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    settings = GenerationSettings(max_new_tokens=8, stop=[], compile=False)
    unmerged = generate_token_ids(model, tok, prompts, GenerationSettings(max_new_tokens=8, stop=[], compile=False,
                                                                          merge_adapter=False))
    monkeypatch.setattr(merged, "BACKUP_SHARE", 0.0)
    assert generate_token_ids(model, tok, prompts, settings) == unmerged
    assert merged._backup_on_host([next(model.parameters())]) == (device.type == "cuda")
    assert all(torch.equal(weights[n][0], p) and weights[n][1] == p.data_ptr() for n, p in model.named_parameters())
