"""Plain and static-steered decoding on merged adapter weights (issue 28, item 1): the unmerged path's
greedy tokens and seeded samples, on tiny Qwen2 and Llama models with LoRA and IA3; the weights
restored bit for bit afterwards (also when decoding raises), so no later scoring pass or dynamic
decode sees them merged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PROMPT_TEXTS, peft_model

from svdecode_pl.decoding import generation
from svdecode_pl.decoding.generation import GenerationSettings, generate_sequences
from svdecode_pl.decoding.merged import merge_support, merged_adapter
from svdecode_pl.models.heads import output_vocab_size
from svdecode_pl.scoring.loglik import score_many
from svdecode_pl.steering.vector import SteeringVector

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory) -> str:
    from svdecode_pl.models.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("merged") / request.param
    return str(build_tiny_model(path, architecture=request.param, embedding_std=0.05))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from svdecode_pl.models.loading import load_tokenizer

    return load_tokenizer(model_dir)


def _decode(model, tokenizer, settings, steering, merge: bool) -> tuple[torch.Tensor, set[bool]]:
    """Sequences, and the merged flags the adapter layers had while the model ran."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: set[bool] = set()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.add(m.merged)) for layer in layers]
    try:
        prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
        settings = dataclasses.replace(settings, merge_adapter=merge)
        out = generate_sequences(model, tokenizer, prompts, settings, steering)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("adapter", ["lora", "ia3"])
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
@pytest.mark.parametrize("steered", [False, True])
def test_merged_decoding_equals_unmerged(model_dir, tokenizer, adapter, strategy, steered):
    model = peft_model(model_dir, adapter)
    before = _weights(model)
    settings = GenerationSettings(max_new_tokens=12, stop=[], do_sample=strategy == "sample", seed=5)
    vector = None
    if steered:
        direction = torch.randn(output_vocab_size(model), generator=torch.Generator().manual_seed(2))
        vector = SteeringVector(direction, 0.5)
    merged, merged_seen = _decode(model, tokenizer, settings, vector, merge=True)
    unmerged, unmerged_seen = _decode(model, tokenizer, settings, vector, merge=False)
    assert merged_seen == {True} and unmerged_seen == {False}  # each path really ran as named
    assert torch.equal(merged, unmerged)
    after = _weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit, not (W + dW) - dW
    plain, _ = _decode(model, tokenizer, dataclasses.replace(settings, seed=6), vector, merge=True)
    assert strategy == "greedy" or not torch.equal(plain, merged)  # the seed decides the samples


def test_weights_restored_when_decoding_raises(model_dir, tokenizer, monkeypatch):
    """A stopping criterion that raises mid-decode leaves the weights, their storage and PEFT's
    merged flags as they were; scores (adapted and dynamic-steered, whose base is adapter off)
    computed afterwards are those computed before, bit for bit."""
    model = peft_model(model_dir, "ia3")  # IA3 merges into new tensors: the storage must come back too
    contexts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS[:2]]
    answers = [[tokenizer(" Paris.")["input_ids"], tokenizer(" Nothing.")["input_ids"]]] * 2
    vector = SteeringVector(None, 2.0, mode="dynamic")
    scores_before = score_many(model, contexts, answers, vector)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    before = _weights(model)

    def boom(self, input_ids, scores=None, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(generation.StopStringsCriteria, "__call__", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        _decode(model, tokenizer, GenerationSettings(max_new_tokens=8, stop=["x"]), None, merge=True)
    monkeypatch.undo()
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    for a, b in zip(scores_before, score_many(model, contexts, answers, vector)):
        assert torch.equal(a.plain, b.plain) and torch.equal(a.steered, b.steered)


def test_what_is_not_merged(model_dir):
    """Prompt learning has nothing to merge; partitioned (ZeRO-3) weights are not merged; a model
    without adapter decodes as it is."""
    assert merge_support(peft_model(model_dir, "lora")) == (True, "")
    assert not merge_support(peft_model(model_dir, "prompt_tuning"))[0]
    lora = peft_model(model_dir, "lora")
    next(p for n, p in lora.named_parameters() if "base_layer" in n).ds_id = 0  # as DeepSpeed marks a partition
    assert merge_support(lora) == (False, "weights partitioned (DeepSpeed ZeRO-3)")
    with merged_adapter(lora) as merged:
        assert merged is False
    with merged_adapter(peft_model(model_dir, "lora"), enabled=False) as merged:
        assert merged is False
