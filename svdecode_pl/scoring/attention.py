"""An attention function registered into transformers: each segment of a packed row
attends to the cached primer and to itself, exactly as in a pass of its own."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdecode_pl.models.heads import hf_model

_SEGMENT_ATTENTION = "svdecode_segments"


@dataclass
class Segment:
    """One context with its continuations inside a packed row: tokens ``[start, stop)``, and the
    attention mask it would have in a forward pass of its own."""

    start: int
    stop: int
    mask: torch.Tensor  # (1, 1, stop - start, prefix + stop - start), bool (SDPA) or additive (eager)


@dataclass
class SegmentLayout:
    """What :func:`segment_attention` needs during one packed forward pass."""

    segments: list[Segment]
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # cached (keys, values) of each layer
    implementation: str  # the model's own attention ("sdpa" or "eager")

_LAYOUT: contextvars.ContextVar[SegmentLayout] = contextvars.ContextVar("svdecode_segment_layout")


def segment_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Attention of a row that packs several contexts: each segment attends, with the model's own
    attention function, to the cached prefix and to itself, with exactly the tensors (shapes,
    mask) of a forward pass of that segment alone. So its scores do not depend on which segments
    share the row (the linear layers compute each row of a matrix product alike whatever the
    other rows); padding after the last segment gets zeros."""
    layout = _LAYOUT.get()
    if layout.implementation != "sdpa":
        attend = sys.modules[type(module).__module__].eager_attention_forward
    elif kwargs.get("softcap") is None and kwargs.get("position_bias") is None:
        attend = grouped_sdpa
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    outputs = []
    for segment in layout.segments:
        span = slice(segment.start, segment.stop)
        keys, values = key[:, :, span], value[:, :, span]
        if layout.prefix is not None:
            cached_keys, cached_values = layout.prefix[module.layer_idx]
            keys, values = torch.cat([cached_keys, keys], dim=-2), torch.cat([cached_values, values], dim=-2)
        outputs.append(attend(module, query[:, :, span], keys, values, segment.mask, **kwargs)[0])
    padding = query.shape[2] - layout.segments[-1].stop
    if padding:
        outputs.append(outputs[-1].new_zeros(1, padding, *outputs[-1].shape[2:]))
    return torch.cat(outputs, dim=1), None


def grouped_sdpa(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for one segment, with its additive mask and the grouped key/value
    heads read in place (``enable_gqa``): transformers copies them once per query head group
    whenever there is a mask, which with the boolean-to-additive conversion doubled the time of
    attention on CPU."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def segment_attention_active(model: nn.Module, layout: SegmentLayout) -> Iterator[None]:
    """Run ``model``'s attention as :func:`segment_attention` over ``layout``."""
    from transformers import AttentionInterface

    if _SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SEGMENT_ATTENTION, segment_attention)
    config = hf_model(model).config
    token = _LAYOUT.set(layout)
    config._attn_implementation = _SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = layout.implementation
        _LAYOUT.reset(token)
