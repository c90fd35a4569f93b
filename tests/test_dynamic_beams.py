"""Dynamic steering under beam search: at mu = 0 the loop's beams are ``generate(num_beams=k)``'s,
token for token (one-pass LoRA loop and two-pass loop, every adapter ``generate`` handles), and
steered beams rank by log_softmax(z_phi + mu*delta_z), as transformers' own beam search ranks them
when it is handed those log-probabilities, recomputed without any cache."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT_TEXTS, peft_model
from transformers import LogitsProcessorList

from svdecode_pl.decoding import mixed_dynamic
from svdecode_pl.decoding.beams import beam_search
from svdecode_pl.decoding.generation import (
    GenerationSettings,
    checkpoint_defaults_ignored,
    generate_sequences,
    generation_config,
    left_padded,
    stop_token_ids,
    stopping_criteria,
)
from svdecode_pl.decoding.streams import positions_of
from svdecode_pl.models.heads import hf_model
from svdecode_pl.steering.vector import SteeringVector

pytestmark = pytest.mark.usefixtures("one_thread")
BEAMS = GenerationSettings(max_new_tokens=8, stop=[], num_beams=3)


def two_pass_only(monkeypatch, one_pass: bool) -> None:
    if not one_pass:
        monkeypatch.setattr(mixed_dynamic, "mixed_batch_support", lambda model: (False, "forced"))


@pytest.mark.parametrize(("adapter", "one_pass"),
                         [("lora", True), ("lora", False), ("ia3", False), ("prompt_tuning", False)])
def test_mu_zero_beams_are_generate_beams(flat_model_dir, flat_tokenizer, prompts, monkeypatch, adapter, one_pass):
    """Whole sequences (prompt, beams' tokens, padding after EOS) equal, both caches reordered."""
    two_pass_only(monkeypatch, one_pass)
    model = peft_model(flat_model_dir, adapter)
    plain = generate_sequences(model, flat_tokenizer, prompts, BEAMS)
    ours = generate_sequences(model, flat_tokenizer, prompts, BEAMS, SteeringVector(None, 0.0, mode="dynamic"))
    assert torch.equal(ours, plain)
    greedy = generate_sequences(model, flat_tokenizer, prompts, GenerationSettings(max_new_tokens=8, stop=[]))
    assert not torch.equal(plain, greedy)  # the beams chose something greedy decoding did not



def test_mu_zero_beam_sampling_is_generate_beam_sampling(flat_model_dir, flat_tokenizer, prompts):
    """Seeded beam sampling draws the same candidates (warpers keeping #EOS + 1 tokens, as generate's)."""
    model = peft_model(flat_model_dir)
    settings = GenerationSettings(max_new_tokens=8, stop=[], num_beams=3, do_sample=True, temperature=0.8, top_k=40,
                                  seed=3)
    plain = generate_sequences(model, flat_tokenizer, prompts, settings)
    at_zero = SteeringVector(None, 0.0, "dynamic")
    assert torch.equal(generate_sequences(model, flat_tokenizer, prompts, settings, at_zero), plain)
    assert not torch.equal(plain, generate_sequences(model, flat_tokenizer, prompts, BEAMS))


class _SteeredLogProbs:
    """Hands transformers' beam search log_softmax(z_phi + mu*delta_z) instead of log_softmax(z_phi),
    both logits recomputed from the running beams without a cache (``naive``: log_softmax(z_phi) + mu*delta_z)."""

    def __init__(self, model, vector: SteeringVector, mask: torch.Tensor, naive: bool = False) -> None:
        self.model, self.vector, self.mask, self.naive = model, vector, mask, naive

    def __call__(self, input_ids, scores):
        new = input_ids.shape[1] - self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(input_ids.shape[0], new)], 1)
        inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=False)
        adapted = self.model(**inputs).logits[:, -1].float()
        with self.model.disable_adapter():
            base = hf_model(self.model)(**inputs).logits[:, -1].float()
        if self.naive:
            return torch.log_softmax(adapted, -1) + self.vector.shift(adapted, base)
        return torch.log_softmax(self.vector.steer(adapted, base), -1)


def _reference_beams(model, flat_tokenizer, prompts, vector, naive: bool = False) -> torch.Tensor:
    input_ids, mask = left_padded(prompts, flat_tokenizer.pad_token_id, torch.device("cpu"))
    config = generation_config(BEAMS, stop_token_ids(model, flat_tokenizer), flat_tokenizer.pad_token_id)
    processor = _SteeredLogProbs(model, vector, mask.repeat_interleave(BEAMS.num_beams, 0), naive)
    with checkpoint_defaults_ignored(model), torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                              logits_processor=LogitsProcessorList([processor]))


@pytest.mark.parametrize("one_pass", [True, False])
def test_steered_beams_rank_by_steered_log_probabilities(flat_model_dir, flat_tokenizer, prompts, monkeypatch,
                                                         one_pass):
    two_pass_only(monkeypatch, one_pass)
    model = peft_model(flat_model_dir)
    vector = SteeringVector(None, 300.0, mode="dynamic")  # flat model: small directions
    ours = generate_sequences(model, flat_tokenizer, prompts, BEAMS, vector)
    assert torch.equal(ours, _reference_beams(model, flat_tokenizer, prompts, vector))
    assert not torch.equal(ours, generate_sequences(model, flat_tokenizer, prompts, BEAMS))  # steering changed beams
    assert not torch.equal(ours, _reference_beams(model, flat_tokenizer, prompts, vector, naive=True))


def test_prefix_tuning_beams_equal_an_uncached_beam_search(flat_model_dir, flat_tokenizer, prompts):
    """PEFT's own ``generate`` gives prefix tuning different beams alone and in a batch (its prefix
    cache under beam search), so the reference here is the same scoring over logits recomputed
    without a cache: the prefix cache, reordered with the beams, changes nothing."""
    model = peft_model(flat_model_dir, "prefix_tuning")
    vector = SteeringVector(None, 300.0, mode="dynamic")
    for prompt in prompts:
        seqs = {"ids": torch.tensor([prompt]).repeat_interleave(BEAMS.num_beams, 0)}

        def advance(tokens, beam_idx, seqs=seqs):
            if tokens is not None:
                seqs["ids"] = torch.cat([seqs["ids"][beam_idx], tokens[:, None]], 1)
            adapted = model(input_ids=seqs["ids"], use_cache=False).logits[:, -1].float()
            with model.disable_adapter():
                base = hf_model(model)(input_ids=seqs["ids"], use_cache=False).logits[:, -1].float()
            return adapted, base

        criteria = stopping_criteria(flat_tokenizer, BEAMS, len(prompt), stop_token_ids(model, flat_tokenizer))
        with torch.no_grad():
            expected = beam_search(advance, seqs["ids"], BEAMS, vector, criteria, flat_tokenizer.pad_token_id)
        assert torch.equal(generate_sequences(model, flat_tokenizer, [prompt], BEAMS, vector), expected)


def _streams_after(model, mask, one_pass, prompt_ids, steps, reorder=None, static=False):
    """(adapted, base) hidden states after feeding ``steps`` (one (rows,) tensor each), reordering
    the beams by ``reorder`` before the last step (``static``: static caches, steps uncompiled)."""
    from contextlib import nullcontext

    from svdecode_pl.decoding.streams import Streams, TwoStreams

    length = prompt_ids.shape[1] + len(steps)
    with mixed_dynamic.mixed_streams(model, mask, length, static) if one_pass else nullcontext() as mixed, \
            torch.no_grad():
        streams = mixed or TwoStreams(model, mask, length, static)
        assert isinstance(streams, Streams)  # the loop's interface, whichever kind
        streams.prefill(prompt_ids)
        for number, tokens in enumerate(steps):
            if reorder is not None and number == len(steps) - 1:
                streams.reorder(reorder)
            hidden = streams.step(tokens)
    return hidden


@pytest.mark.parametrize(("adapter", "one_pass", "static"), [
    ("lora", True, False), ("lora", False, False), ("prefix_tuning", False, False), ("lora", True, True),
    ("ia3", False, True)])
def test_reorder_moves_both_caches_with_the_beams(flat_model_dir, flat_tokenizer, adapter, one_pass, static,
                                                   eager_steps):
    """After a reorder, each row continues the history of the beam it took: adapted and base
    states as fresh streams fed the reordered histories (static caches: reordered in place)."""
    model = peft_model(flat_model_dir, adapter)
    assert not one_pass or mixed_dynamic.mixed_batch_support(model)[0]  # the one-pass streams run
    prompt_ids = torch.tensor([flat_tokenizer(PROMPT_TEXTS[0])["input_ids"]]).repeat(4, 1)
    mask = torch.ones_like(prompt_ids)
    first, second = torch.tensor([11, 22, 33, 44]), torch.tensor([5, 6, 7, 8])
    order = torch.tensor([2, 0, 0, 3])
    reordered = _streams_after(model, mask, one_pass, prompt_ids, [first, second], reorder=order, static=static)
    fresh = _streams_after(model, mask, one_pass, prompt_ids, [first[order], second], static=static)
    for got, expected in zip(reordered, fresh):
        torch.testing.assert_close(got, expected)
    unordered = _streams_after(model, mask, one_pass, prompt_ids, [first, second], static=static)
    assert not torch.allclose(reordered[1], unordered[1])  # the base state's history matters
