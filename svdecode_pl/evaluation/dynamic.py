"""Dynamic steering's own decoding loop: the adapted and the base model side by side (LoRA: as one
doubled batch, :mod:`.mixed_dynamic`), with their key/value caches (dynamic, or static with compiled
steps, :mod:`.compiled`), the direction recomputed from both logits at every step; greedy,
sampling, or beam search (:mod:`.dynamic_beams`, the caches reordered with the beams)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
)

from svdecode_pl.evaluation.compiled import cache_capacity, cache_keyword, compiled_call, reorder_cache, static_cache
from svdecode_pl.evaluation.dynamic_beams import beam_search
from svdecode_pl.evaluation.generation_settings import GenerationSettings, sampling_warpers
from svdecode_pl.models.heads import hf_model, is_peft_model, is_prompt_learning
from svdecode_pl.steering.vector import SteeringVector


@dataclass
class DynamicDecodeOutput:
    """What :func:`dynamic_steered_decode` produced."""

    sequences: torch.Tensor
    """(B, L + new) prompt and generated ids (pad after a row ends)."""
    adapted_logits: list[torch.Tensor] = field(default_factory=list)
    """Per step, the adapted model's (B, V) float32 logits (with ``keep_logits`` only)."""
    base_logits: list[torch.Tensor] = field(default_factory=list)
    """Per step, the pre-trained model's (B, V) float32 logits (with ``keep_logits`` only)."""


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask, as ``generate`` makes them: real tokens count from 0, pads are 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 0)


class AdapterSwitch:
    """Turns a PeftModel's adapter layers off and on around one forward pass, cheaply.

    PEFT's ``disable_adapter()`` context inspects every module (``get_model_status``) and resets
    ``requires_grad`` on each use, which costs more than a tiny model's decoding step; here the
    tuner layers are collected once and only their disable flag (what their forward reads) flips.
    Prompt learning has no adapter layers: its pre-trained model is the wrapped model itself.
    """

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        self.layers = [m for m in model.modules() if isinstance(m, kinds) and hasattr(m, "_disable_adapters")]

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        states = [layer._disable_adapters for layer in self.layers]
        try:
            for layer in self.layers:
                layer._disable_adapters = True
            yield
        finally:
            for layer, state in zip(self.layers, states):
                layer._disable_adapters = state


class CachedStream:
    """One model state (adapted or pre-trained) decoding a left-padded batch with its own KV cache.

    Eager: a dynamic cache and a mask growing by one column per step, as ``generate`` keeps them.
    Compiled (``compiled``): a static cache (:func:`~.compiled.static_cache`) and a mask of its fixed
    width (the prompt's padding, then ones: causality hides the positions not written yet), so every
    step has the same shapes and runs :func:`~.compiled.compiled_call`; the prefill stays eager.
    Prompt Tuning / P-Tuning put their virtual tokens in front of the batch (``virtual_tokens``
    columns of mask, positions counted from them, as PEFT's forward does for one unpadded row);
    Prefix Tuning puts them in the cache (both eager only). The pre-trained state sees the real tokens only.
    Each pass returns the last position's final hidden states (the decoder's output): the caller
    applies the output head to both states at once (:func:`dynamic_steered_decode`).
    """

    def __init__(self, model: nn.Module, adapted: bool, attention_mask: torch.Tensor, max_length: int,
                 compiled: bool = False, slot: str | None = None) -> None:
        self.model, self.adapted = model, adapted
        self.decoder = hf_model(model).get_decoder()
        self.cache_keyword = cache_keyword(self.decoder)
        self.prompt_learning = adapted and is_prompt_learning(model)
        self.virtual_tokens = model.active_peft_config.num_virtual_tokens if self.prompt_learning else 0
        batch = attention_mask.shape[0]
        full = torch.cat([attention_mask.new_ones(batch, self.virtual_tokens), attention_mask], dim=1)
        self.prefill_positions = positions_of(full)
        self.next_position = self.prefill_positions[:, -1:] + 1
        self.compiled = compiled and not self.prompt_learning
        self.step_call: Any = self.decoder
        if self.compiled:
            self.cache = static_cache(model, slot or ("adapted" if adapted else "base"), batch, max_length)
            self.mask: torch.Tensor | None = torch.cat(
                [full, full.new_ones(batch, cache_capacity(self.cache) - full.shape[1])], dim=1)
            self.step_call = partial(compiled_call(full.device), self.decoder)
        else:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=hf_model(model).config.get_text_config(decoder=True))
            # generate drops an all-ones mask (no padding): do the same, for the same kernels
            self.mask = None if bool(attention_mask.all()) else full
        self.switch = AdapterSwitch(model) if not adapted and is_peft_model(model) else None

    def _forward(self, call: Any, **inputs: Any) -> torch.Tensor:
        switch = contextlib.nullcontext() if self.switch is None else self.switch.off()
        with switch:
            out = call(attention_mask=self.mask, use_cache=True, **{self.cache_keyword: self.cache}, **inputs)
        hidden = out.last_hidden_state[:, -1]
        return hidden.clone() if self.compiled else hidden  # a CUDA graph's output is overwritten by its next replay

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode the prompts; the last position's hidden states."""
        positions = self.prefill_positions
        if not self.prompt_learning:
            return self._forward(self.decoder, input_ids=input_ids, position_ids=positions)
        peft_model = self.model
        batch = input_ids.shape[0]
        if peft_model.active_peft_config.peft_type == "PREFIX_TUNING":
            self.cache = peft_model.get_prompt(batch, max_cache_len=input_ids.shape[1] + self.virtual_tokens)
            return self._forward(self.decoder, input_ids=input_ids, position_ids=positions[:, self.virtual_tokens :])
        embeds = hf_model(peft_model).get_input_embeddings()(input_ids)
        prompts = peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
        return self._forward(self.decoder, inputs_embeds=torch.cat([prompts, embeds], dim=1), position_ids=positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,); the hidden states that predict the next one."""
        if self.mask is not None and not self.compiled:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        hidden = self._forward(self.step_call, input_ids=tokens[:, None], position_ids=self.next_position)
        self.next_position = self.next_position + 1
        return hidden

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the beams: the mask and positions are a prompt's, the same for all its beams."""
        reorder_cache(self.cache, beam_idx)


class TwoStreams:
    """The adapted and the base state as two :class:`CachedStream` passes (any adapter)."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor, max_length: int, compiled: bool) -> None:
        self.adapted = CachedStream(model, True, attention_mask, max_length, compiled)
        self.base = CachedStream(model, False, attention_mask, max_length, compiled)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapted.prefill(input_ids), self.base.prefill(input_ids)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapted.step(tokens), self.base.step(tokens)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.adapted.reorder(beam_idx)
        self.base.reorder(beam_idx)


@torch.no_grad()
def dynamic_steered_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    steering: SteeringVector,
    criteria: StoppingCriteriaList,
    pad_id: int,
    keep_logits: bool = False,
    one_pass: bool = True,
    compiled: bool = False,
) -> DynamicDecodeOutput:
    """Greedy, sampled or beam-search decoding of a left-padded batch with steering recomputed at every step.

    Per step the adapted and the pre-trained model each run once on the new token with their
    own KV cache (no re-encoding); the output head maps both states' hidden states in one matrix
    product (its weights are read once: at a 152k vocabulary the head is most of a small
    model's step), and the token is chosen from ``steering.steer(adapted, base)``
    as ``generate`` would choose it from logits (same warpers, same ``multinomial`` draw, pad
    after a row has stopped; under beam search, the same scoring of log_softmax of the steered
    logits, see :mod:`.dynamic_beams`), so a zero ``mu`` gives ``generate``'s tokens. With
    ``one_pass`` and a LoRA adapter both states run in one forward of a doubled batch, each LoRA
    layer's update masked per row (:mod:`.mixed_dynamic`). ``compiled``: static caches and
    compiled steps (:mod:`.compiled`). With beams, ``keep_logits`` keeps each step's logits of the
    running beams (B * num_beams rows).
    """
    from svdecode_pl.evaluation.mixed_dynamic import RowMaskUnsupported, mixed_streams

    if settings.num_beams > 1:  # every prompt once per beam, as ``generate`` expands its inputs
        input_ids = input_ids.repeat_interleave(settings.num_beams, dim=0)
        attention_mask = attention_mask.repeat_interleave(settings.num_beams, dim=0)
    max_length = input_ids.shape[1] + settings.max_new_tokens
    decode = partial(_decode, model, input_ids=input_ids, settings=settings, steering=steering, criteria=criteria,
                     pad_id=pad_id, keep_logits=keep_logits)
    if one_pass:
        try:
            with mixed_streams(model, attention_mask, max_length, compiled) as mixed:
                if mixed is not None:
                    return decode(mixed)
        except RowMaskUnsupported:  # found in the prefill, before any token was drawn
            pass
    return decode(TwoStreams(model, attention_mask, max_length, compiled))


def _decode(model: nn.Module, streams: Any, *, input_ids: torch.Tensor, settings: GenerationSettings,
            steering: SteeringVector, criteria: StoppingCriteriaList, pad_id: int,
            keep_logits: bool) -> DynamicDecodeOutput:
    """The token loop of :func:`dynamic_steered_decode` over either kind of streams."""
    head = hf_model(model).get_output_embeddings()
    batch = input_ids.shape[0]
    output = DynamicDecodeOutput(input_ids)

    def logits_of(hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(torch.cat(hidden)).float()
        return logits[:batch], logits[batch:]

    def record(adapted: torch.Tensor, base: torch.Tensor) -> None:
        output.adapted_logits.append(adapted.clone())
        output.base_logits.append(base.clone())

    if settings.num_beams > 1:
        def advance(tokens: torch.Tensor | None, beam_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if tokens is None:
                return logits_of(streams.prefill(input_ids))
            streams.reorder(beam_idx)
            return logits_of(streams.step(tokens))

        output.sequences = beam_search(advance, input_ids, settings, steering, criteria, pad_id,
                                       record if keep_logits else None)
        return output
    warpers = sampling_warpers(settings) if settings.do_sample else LogitsProcessorList()
    adapted, base = logits_of(streams.prefill(input_ids))
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    pad_eos = any(hasattr(c, "eos_token_id") for c in criteria)
    sequences = input_ids
    while True:
        if keep_logits:
            record(adapted, base)
        scores = steering.steer(adapted, base)
        if settings.do_sample:
            probs = torch.softmax(warpers(sequences, scores), dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if pad_eos:
            tokens = tokens * unfinished + pad_id * (1 - unfinished)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~criteria(sequences, None)
        if unfinished.max() == 0:
            break
        adapted, base = logits_of(streams.step(tokens))
    output.sequences = sequences
    return output
