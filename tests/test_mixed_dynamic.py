"""The one-pass dynamic loop (LoRA rows adapted and base in one doubled batch) gives the two-pass
loop's tokens, greedy and seeded sampling, and runs one forward per step; other adapters keep two."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.evaluation import mixed_dynamic
from svdecode_pl.evaluation.generation import GenerationSettings, generate_token_ids
from svdecode_pl.models.heads import hf_model
from svdecode_pl.models.loading import load_causal_lm, load_tokenizer, resolve_name_or_path
from svdecode_pl.steering.vector import SteeringVector

PROMPTS = ["Q: What is the capital of France?\nA:", "Q: Why?\nA:", "Q: Are all mammals vertebrates at all?\nA:"]


def build(config):
    path = resolve_name_or_path("svdecode-tiny")
    torch.manual_seed(0)
    return get_peft_model(load_causal_lm(path), config).eval(), load_tokenizer(path)


def lora():
    return build(LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))


def decode(model, tok, settings, monkeypatch, one_pass: bool) -> tuple[list[list[int]], int]:
    """Tokens and the number of forward passes of the transformers model."""
    if not one_pass:
        monkeypatch.setattr(mixed_dynamic, "mixed_batch_support", lambda model: (False, "forced"))
    calls = []
    handle = hf_model(model).register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(3)
    try:
        ids = generate_token_ids(model, tok, [tok(p)["input_ids"] for p in PROMPTS], settings,
                                 SteeringVector(None, 4.0, mode="dynamic"))
    finally:
        handle.remove()
        monkeypatch.undo()
    return ids, len(calls)


@pytest.mark.parametrize("sample", [False, True])
def test_one_pass_equals_two_pass(sample, monkeypatch) -> None:
    model, tok = lora()
    settings = GenerationSettings(max_new_tokens=10, stop=[], do_sample=sample, temperature=1.0, top_p=1.0)
    one, one_calls = decode(model, tok, settings, monkeypatch, one_pass=True)
    two, two_calls = decode(model, tok, settings, monkeypatch, one_pass=False)
    assert one == two
    assert two_calls == 2 * one_calls  # the one-pass loop really ran: one forward per step


def test_one_pass_logits_equal_two_pass_logits() -> None:
    """Both states' logits at every step equal the two-pass loop's (base rows really unadapted)."""
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    from svdecode_pl.evaluation.dynamic import dynamic_steered_decode

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
