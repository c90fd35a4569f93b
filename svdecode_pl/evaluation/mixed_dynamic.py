"""Dynamic steering in one forward pass per step, for LoRA (issue 21, item 6).

Rows ``[adapted; base]`` of a doubled batch go through the model once; PEFT's mixed adapter batches
(its ``adapter_names`` pre-forward hook, with ``"__base__"`` rows) add the LoRA delta to the first
half only, so the frozen weights are read once per step for both model states, and one KV cache of
batch 2B holds both. Allow-list detection: PEFT's IA3 silently ignores ``adapter_names`` (every row
adapted) and prompt learning has no tuner layers, so anything but plain LoRA keeps the two-pass loop
of :mod:`svdecode_pl.evaluation.dynamic`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from svdecode_pl.models.heads import hf_model, hidden_states_as_logits, is_peft_model


def mixed_batch_support(model: nn.Module) -> tuple[bool, str]:
    """(supported, why not): plain, unmerged, non-DoRA LoRA layers of one active adapter only."""
    if not is_peft_model(model):
        return False, "not a PeftModel"
    from peft.tuners.lora import LoraLayer, LoraModel

    if model.active_peft_config.is_prompt_learning:
        return False, "prompt learning (virtual tokens, no tuner layers)"
    if type(model.base_model) is not LoraModel:  # IA3 drops adapter_names; AdaLoRA's layers ignore them
        return False, f"{type(model.base_model).__name__}: no mixed-batch forward"
    if not isinstance(model.active_adapter, str):
        return False, "several active adapters"
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if type(module).__module__ != "peft.tuners.lora.layer":
                return False, f"{type(module).__name__}: quantized or parallel LoRA layer"
            if module.merged or any(module.use_dora.values()) or getattr(module, "lora_variant", None):
                return False, "merged, DoRA or variant LoRA layer"
    return True, ""


@contextlib.contextmanager
def adapter_names_hooks(model: nn.Module, names: list[str]) -> Iterator[None]:
    """PEFT's own per-row adapter selection, registered once for a whole decoding loop (calling the
    PeftModel with ``adapter_names`` would walk every module twice per step)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook
    from peft.utils.other import AuxiliaryTrainingWrapper

    hook = partial(_adapter_names_pre_forward_hook, adapter_names=names)
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in model.modules()
               if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MixedStreams:
    """Both model states in one doubled batch and one cache; the same interface as the two
    :class:`~svdecode_pl.evaluation.dynamic.CachedStream` objects it replaces."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor) -> None:
        from svdecode_pl.evaluation.dynamic import positions_of

        self.model, self.inner = model, hf_model(model)
        self.batch = attention_mask.shape[0]
        full = torch.cat([attention_mask, attention_mask])
        self.mask: torch.Tensor | None = None if bool(attention_mask.all()) else full
        self.prefill_positions = positions_of(full)
        self.next_position = self.prefill_positions[:, -1:] + 1
        self.cache: Any = None
        keep = "logits_to_keep" in inspect.signature(self.inner.forward).parameters
        self.extra = {"logits_to_keep": 1} if keep else {}

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with hidden_states_as_logits(self.model):
            out = self.inner(input_ids=torch.cat([ids, ids]), attention_mask=self.mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, **self.extra)
        self.cache = out.past_key_values
        hidden = out.logits[:, -1]
        return hidden[: self.batch], hidden[self.batch :]

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the prompts; (adapted, base) last hidden states."""
        return self._forward(input_ids, self.prefill_positions)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row; (adapted, base) hidden states that predict the next one."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        hidden = self._forward(tokens[:, None], self.next_position)
        self.next_position = self.next_position + 1
        return hidden

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the beams in both halves of the cache (adapted rows, then base rows)."""
        from svdecode_pl.evaluation.dynamic import reorder_cache

        reorder_cache(self.cache, torch.cat([beam_idx, beam_idx + self.batch]))


@contextlib.contextmanager
def mixed_streams(model: nn.Module, attention_mask: torch.Tensor) -> Iterator[MixedStreams | None]:
    """One-pass streams with the adapter hooks in place, or None where the adapter cannot mix rows."""
    if not mixed_batch_support(model)[0]:
        yield None
        return
    names = [model.active_adapter] * attention_mask.shape[0] + ["__base__"] * attention_mask.shape[0]
    with adapter_names_hooks(model, names):
        yield MixedStreams(model, attention_mask)
