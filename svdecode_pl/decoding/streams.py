"""The model states the dynamic loop drives (:mod:`.dynamic`): each pass returns the adapted and the
pre-trained model's last hidden states for the new position. :class:`Streams` is the interface;
:class:`TwoStreams` runs the two states as two cached passes (any adapter), :class:`~.mixed_dynamic.MixedStreams`
as one doubled batch (LoRA)."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from svdecode_pl.decoding.compiled import cache_capacity, cache_keyword, compiled_call, reorder_cache, static_cache
from svdecode_pl.models.heads import hf_model, is_peft_model
from svdecode_pl.models.peft_methods import AdapterSwitch, is_prompt_learning, method_of, virtual_token_count


@runtime_checkable
class Streams(Protocol):
    """Both model states decoding one left-padded batch, each with its KV cache."""

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the prompts; (adapted, base) last hidden states, (B, H) each."""
        ...

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row (B,); (adapted, base) hidden states that predict the next one."""
        ...

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the surviving beams (rows of the batch) in every cache."""
        ...


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask, as ``generate`` makes them: real tokens count from 0, pads are 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 0)


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
        self.virtual_tokens = virtual_token_count(model) if adapted else 0
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
        if method_of(peft_model).prefix_in_cache:
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


