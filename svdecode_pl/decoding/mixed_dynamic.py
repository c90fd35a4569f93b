"""Dynamic steering in one forward pass per step, for LoRA: per-row masked updates.

Rows ``[adapted; base]`` of a doubled batch go through the model once, so the frozen weights are read
once per step for both model states and one KV cache of 2B rows holds both. PEFT's LoRA layer adds
``lora_B(lora_A(x)) * scaling`` with ``scaling`` read from ``layer.scaling[adapter]`` at every call;
while decoding, that entry is a (2B, 1, 1) tensor, ``scaling`` on the adapted rows and 0 on the base
rows: every row runs the same kernels (no split of the batch by adapter name, as PEFT's mixed adapter
batches do in Python per layer), the base rows get ``W x + 0``, exactly the adapter-off output. The
adapted rows get exactly ``lora_B(lora_A(x)) * scaling`` as long as ``scaling`` is exact in the
adapter's dtype (checked: ``* tensor`` and ``* float`` round alike then).

Allow-list: plain LoRA Linear / Embedding layers of one active adapter, unmerged, no DoRA or other
variant, no ``modules_to_save`` / trainable tokens (those would adapt every row); IA3, AdaLoRA,
prompt learning and the rest keep the two passes of :class:`~.streams.TwoStreams`. The
prefill checks that each LoRA layer sees batch-first inputs (a model that flattens rows, e.g. into
a router, would broadcast the mask wrongly) and falls back to two passes otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from svdecode_pl.decoding.streams import CachedStream, Streams
from svdecode_pl.models.peft_methods import lacks


class RowMaskUnsupported(RuntimeError):
    """A LoRA layer's input is not batch-first: its per-row mask would broadcast wrongly."""


def _lora_b_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    if adapter in getattr(layer, "lora_B", {}):
        return layer.lora_B[adapter].weight
    return layer.lora_embedding_B[adapter]


def _exact_in(scale: float, dtype: torch.dtype) -> bool:
    """Whether ``x * torch.tensor(scale, dtype)`` rounds as ``x * scale`` (float32 opmath) does."""
    return float(torch.tensor(scale, dtype=dtype)) == float(torch.tensor(scale, dtype=torch.float32))


def mixed_batch_support(model: nn.Module) -> tuple[bool, str]:
    """(supported, why not): plain, unmerged, non-DoRA LoRA layers of one active adapter only."""
    why_not = lacks(model, "mixes_rows")  # IA3, prompt learning: two passes
    if why_not is not None:
        return False, why_not
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Embedding, Linear
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not isinstance(model.active_adapter, str):
        return False, "several active adapters"
    adapter = model.active_adapter
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return False, f"{type(module).__name__} (modules_to_save / trainable tokens) adapts every row"
        if isinstance(module, LoraLayer):
            if type(module) not in (Linear, Embedding):
                return False, f"{type(module).__name__}: not a plain LoRA Linear or Embedding layer"
            if module.merged or any(module.use_dora.values()) or getattr(module, "lora_variant", None):
                return False, "merged, DoRA or variant LoRA layer"
            if adapter in module.scaling and not _exact_in(module.scaling[adapter],
                                                           _lora_b_weight(module, adapter).dtype):
                return False, f"LoRA scaling {module.scaling[adapter]} is not exact in the adapter's dtype"
    return True, ""


@functools.lru_cache(maxsize=64)
def _row_scaling(rows: int, adapted: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, 1, 1): ``scale`` on the first ``adapted`` rows, 0 below; one tensor per shape and scale,
    kept (a fixed address, so compiled CUDA graphs read it in place across batches)."""
    mask = torch.zeros(rows, 1, 1, dtype=dtype, device=device)
    mask[:adapted] = scale
    torch._dynamo.mark_static_address(mask)
    return mask


def _lora_layers(model: nn.Module, adapter: str) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]


@contextlib.contextmanager
def row_scaled_lora(model: nn.Module, adapted_rows: int, rows: int) -> Iterator[None]:
    """Within: each LoRA layer's update scaled per row (the first ``adapted_rows`` rows adapted)."""
    adapter = model.active_adapter
    saved = [(layer, layer.scaling[adapter]) for layer in _lora_layers(model, adapter)]
    try:
        for layer, scale in saved:
            weight = _lora_b_weight(layer, adapter)
            layer.scaling[adapter] = _row_scaling(rows, adapted_rows, float(scale), weight.dtype, weight.device)
        yield
    finally:
        for layer, scale in saved:
            layer.scaling[adapter] = scale


@contextlib.contextmanager
def batch_first_checked(model: nn.Module, rows: int) -> Iterator[None]:
    """Within: a LoRA layer whose output would not be (rows, T, features) raises :class:`RowMaskUnsupported`."""
    from peft.tuners.lora.layer import Embedding

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        dims = x.dim() + (1 if isinstance(module, Embedding) else 0)
        if dims != 3 or x.shape[0] != rows:
            raise RowMaskUnsupported(f"{type(module).__name__} input of shape {tuple(x.shape)}, not ({rows}, T, ...)")

    handles = [m.register_forward_pre_hook(check, with_kwargs=True)
               for m in _lora_layers(model, model.active_adapter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MixedStreams:
    """Both model states in one doubled batch and one cache (:class:`~.streams.Streams`), in place of
    :class:`~.streams.TwoStreams`."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor, max_length: int, compiled: bool) -> None:
        self.model, self.batch = model, attention_mask.shape[0]
        doubled = torch.cat([attention_mask, attention_mask])
        self.stream = CachedStream(model, True, doubled, max_length, compiled, slot="mixed")

    def _split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden[: self.batch], hidden[self.batch :]

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the prompts; (adapted, base) last hidden states."""
        with batch_first_checked(self.model, 2 * self.batch):
            return self._split(self.stream.prefill(torch.cat([input_ids, input_ids])))

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row; (adapted, base) hidden states that predict the next one."""
        return self._split(self.stream.step(torch.cat([tokens, tokens])))

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the beams in both halves of the cache (adapted rows, then base rows)."""
        self.stream.reorder(torch.cat([beam_idx, beam_idx + self.batch]))


@contextlib.contextmanager
def mixed_streams(model: nn.Module, attention_mask: torch.Tensor, max_length: int,
                  compiled: bool = False) -> Iterator[Streams | None]:
    """One-pass streams with the per-row LoRA scaling in place, or None where the adapter cannot mix rows."""
    if not mixed_batch_support(model)[0]:
        yield None
        return
    batch = attention_mask.shape[0]
    with row_scaled_lora(model, batch, 2 * batch):
        yield MixedStreams(model, attention_mask, max_length, compiled)
