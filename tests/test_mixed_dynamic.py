"""The one-pass dynamic loop (LoRA rows adapted and base in one doubled batch, each LoRA update
masked per row) gives the two-pass loop's tokens, greedy, seeded sampling and beams, runs one
forward per step without PEFT's per-adapter split, and leaves the LoRA layers as it found them;
other adapters keep two passes."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.decoding import mixed_dynamic
from svdecode_pl.decoding.generation import GenerationSettings, generate_token_ids
from svdecode_pl.models.heads import hf_model
from svdecode_pl.models.loading import load_causal_lm, load_tokenizer, resolve_name_or_path
from svdecode_pl.steering.vector import SteeringVector

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: Why?\nA:", "Q: Are all mammals vertebrates at all?\nA:"]


def build(config, path=None):
    path = path or resolve_name_or_path("svdecode-tiny")
    torch.manual_seed(0)
    return get_peft_model(load_causal_lm(path), config).eval(), load_tokenizer(path)


def lora(path=None):
    return build(LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"), path)


def decode(model, tok, settings, monkeypatch, one_pass: bool, mu: float = 4.0) -> tuple[list[list[int]], int]:
    """Tokens and the number of forward passes of the transformers model's decoder."""
    if not one_pass:
        monkeypatch.setattr(mixed_dynamic, "mixed_batch_support", lambda model: (False, "forced"))
    calls = []
    handle = hf_model(model).get_decoder().register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(3)
    try:
        ids = generate_token_ids(model, tok, [tok(p)["input_ids"] for p in PROMPTS], settings,
                                 SteeringVector(None, mu, mode="dynamic"))
    finally:
        handle.remove()
        monkeypatch.undo()
    return ids, len(calls)


def _no_adapter_split(*args, **kwargs):
    raise AssertionError("PEFT's mixed adapter batch (a Python split by adapter name) ran")


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beams"])
def test_one_pass_equals_two_pass(strategy, flat_model_dir, monkeypatch) -> None:
    """On the flat tiny model, where steering changes the tokens (so a base state that were not the
    pre-trained model's would show)."""
    from peft.tuners.lora.layer import LoraLayer

    model, tok = lora(flat_model_dir)
    settings = GenerationSettings(max_new_tokens=10, stop=[], do_sample=strategy == "sample", temperature=1.0,
                                  top_p=1.0, num_beams=3 if strategy == "beams" else 1)
    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", _no_adapter_split)
    one, one_calls = decode(model, tok, settings, monkeypatch, one_pass=True, mu=300.0)
    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", _no_adapter_split)
    two, two_calls = decode(model, tok, settings, monkeypatch, one_pass=False, mu=300.0)
    assert one == two
    assert one != decode(model, tok, settings, monkeypatch, one_pass=False, mu=0.0)[0]  # steering mattered
    assert one_calls > 0 and two_calls == 2 * one_calls  # the one-pass loop really ran: one forward per step
    assert all(isinstance(m.scaling["default"], float) for m in model.modules() if isinstance(m, LoraLayer))


def test_one_pass_logits_equal_two_pass_logits() -> None:
    """Both states' logits at every step equal the two-pass loop's (base rows really unadapted)."""
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    from svdecode_pl.decoding.dynamic import dynamic_steered_decode

    model, tok = lora()
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    criteria = StoppingCriteriaList([MaxLengthCriteria(width + 6)])
    settings, vector = GenerationSettings(max_new_tokens=6, stop=[]), SteeringVector(None, 4.0, mode="dynamic")
    one, two = (dynamic_steered_decode(model, ids, mask, settings, vector, criteria, 0, keep_logits=True,
                                       one_pass=flag) for flag in (True, False))
    assert torch.equal(one.sequences, two.sequences)
    for kind in ("adapted_logits", "base_logits"):
        for a, b in zip(getattr(one, kind), getattr(two, kind)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.allclose(one.adapted_logits[0], one.base_logits[0], atol=1e-3)


def test_allow_list() -> None:
    assert mixed_dynamic.mixed_batch_support(lora()[0]) == (True, "")
    ia3, _ = build(IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM"))
    assert not mixed_dynamic.mixed_batch_support(ia3)[0]  # PEFT would silently adapt every row
    prompt, _ = build(PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert not mixed_dynamic.mixed_batch_support(prompt)[0]
    assert not mixed_dynamic.mixed_batch_support(hf_model(prompt))[0]


def test_embedding_lora_and_exact_scaling() -> None:
    """A LoRA on the embeddings masks per row as the linear layers do; a scaling the adapter's dtype
    cannot hold exactly (rsLoRA's alpha / sqrt(r) in bfloat16) keeps two passes."""
    model, tok = build(LoraConfig(r=8, target_modules=["embed_tokens", "q_proj", "down_proj"], init_lora_weights=False,
                                  task_type="CAUSAL_LM"))
    assert mixed_dynamic.mixed_batch_support(model) == (True, "")
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    from svdecode_pl.decoding.dynamic import dynamic_steered_decode

    rows = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    settings, vector = GenerationSettings(max_new_tokens=5, stop=[]), SteeringVector(None, 4.0, mode="dynamic")
    one, two = (dynamic_steered_decode(model, ids, mask, settings, vector, StoppingCriteriaList(
        [MaxLengthCriteria(width + 5)]), 0, keep_logits=True, one_pass=flag) for flag in (True, False))
    assert torch.equal(one.sequences, two.sequences)
    for a, b in zip(one.base_logits + one.adapted_logits, two.base_logits + two.adapted_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert mixed_dynamic._exact_in(2.0, torch.bfloat16) and not mixed_dynamic._exact_in(16 / 8**0.5, torch.bfloat16)
    rslora, _ = build(LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"],
                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    assert mixed_dynamic.mixed_batch_support(rslora)[0]  # float32 adapter weights: exact
    assert not mixed_dynamic.mixed_batch_support(rslora.to(torch.bfloat16))[0]


def test_scaling_restored_and_flattened_inputs_fall_back(monkeypatch) -> None:
    """A LoRA layer fed rows flattened into one dimension is caught in the prefill: the decode falls
    back to two passes (same tokens), and every layer's scaling is a float again, also after an error."""
    from peft.tuners.lora.layer import LoraLayer

    model, tok = lora()
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with pytest.raises(mixed_dynamic.RowMaskUnsupported), mixed_dynamic.batch_first_checked(model, 4):
        layer(torch.zeros(4 * 3, layer.in_features))  # (rows * T, features): a flattening module
    settings = GenerationSettings(max_new_tokens=6, stop=[])
    two, _ = decode(model, tok, settings, monkeypatch, one_pass=False)
    real_check = mixed_dynamic.batch_first_checked
    monkeypatch.setattr(mixed_dynamic, "batch_first_checked", lambda model, rows: real_check(model, rows + 1))
    calls = []
    handle = hf_model(model).get_decoder().register_forward_hook(lambda *args: calls.append(1))
    try:
        fallen = generate_token_ids(model, tok, [tok(p)["input_ids"] for p in PROMPTS], settings,
                                    SteeringVector(None, 4.0, mode="dynamic"))
    finally:
        handle.remove()
    assert fallen == two and len(calls) == 2 * 6  # the refused prefill raised; then two passes per token
    assert all(isinstance(m.scaling["default"], float) for m in model.modules() if isinstance(m, LoraLayer))
