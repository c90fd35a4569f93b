"""Scoring with a shared context cache equals scoring whole sequences, for every adapter."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.modeling import load_causal_lm, load_tokenizer, output_vocab_size
from svdecode_pl.scoring import score_continuations, target_hidden_states
from svdecode_pl.steering import SteeringVector, steering_direction

ADAPTERS = {
    "none": lambda: None,
    "lora": lambda: LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def build(name: str, adapter: str):
    model = load_causal_lm(name)
    config = ADAPTERS[adapter]()
    model = get_peft_model(model, config) if config is not None else model
    return model.eval(), load_tokenizer(name)


def reference_scores(model, context, continuations, vector):
    """Whole-sequence forward passes, the steering applied by hand."""
    plain, steered = [], []
    for cont in continuations:
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            adapted = model(input_ids=ids).logits[0, -ids.shape[1]:].float()
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    base = model(input_ids=ids).logits[0].float()
            else:
                base = adapted
        rows = slice(len(context) - 1, ids.shape[1] - 1)
        y = torch.tensor(cont)[:, None]
        plain.append(torch.log_softmax(adapted[rows], -1).gather(-1, y).sum())
        if vector.mode == "static":
            shifted = adapted + vector.mu * vector.direction
        else:
            shifted = adapted + vector.mu * steering_direction(adapted, base, vector.confidence_threshold)
        steered.append(torch.log_softmax(shifted[rows], -1).gather(-1, y).sum())
    return torch.stack(plain).double(), torch.stack(steered).double()


@pytest.mark.parametrize("arch", ["svdecode-tiny", "svdecode-tiny-llama"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cached_scoring_equals_whole_sequences(arch, adapter, mode):
    model, tok = build(arch, adapter)
    context = tok("Q: What happens if you break a mirror?\nA:")["input_ids"]
    answers = (" Nothing happens.", " You will have seven years of bad luck.", " No")
    continuations = [tok(a)["input_ids"] for a in answers]
    vocab = output_vocab_size(model)
    if mode == "static":
        vector = SteeringVector(torch.randn(vocab), 0.7)
    else:
        vector = SteeringVector(None, 3.0, mode="dynamic", confidence_threshold=1e-4, metadata={"vocab_size": vocab})
    scores = score_continuations(model, context, continuations, vector, chunk_tokens=5)
    plain, steered = reference_scores(model, context, continuations, vector)
    torch.testing.assert_close(scores.plain, plain, rtol=0, atol=5e-5)
    torch.testing.assert_close(scores.steered, steered, rtol=0, atol=5e-5)
    if mode == "static":
        assert not torch.allclose(scores.plain, scores.steered)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "lora"])
def test_target_hidden_states_align_virtual_tokens(adapter):
    """Adapted and base outputs line up on the same real tokens (virtual tokens dropped)."""
    model, tok = build("svdecode-tiny", adapter)
    ids = torch.tensor([tok("Q: What color is a lemon?\nA: It is yellow.")["input_ids"]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, -4:] = True
    with torch.no_grad():
        hidden, targets, head = target_hidden_states(model, ids, torch.ones_like(ids), mask)
        full = model(input_ids=ids).logits[0]
    assert torch.equal(targets, ids[0, -4:])
    torch.testing.assert_close(head(hidden), full[-5:-1], rtol=1e-5, atol=1e-5)


def test_mu_zero_scores_exactly_plain():
    model, tok = build("svdecode-tiny", "lora")
    context = tok("Q: What color is a lemon?\nA:")["input_ids"]
    continuations = [tok(" It is yellow.")["input_ids"], tok(" It is blue.")["input_ids"]]
    vocab = output_vocab_size(model)
    for vector in (SteeringVector(torch.randn(vocab), 0.0),
                   SteeringVector(None, 0.0, mode="dynamic", metadata={"vocab_size": vocab})):
        scores = score_continuations(model, context, continuations, vector)
        assert torch.equal(scores.plain, scores.steered)
