"""What a PEFT model needs under DeepSpeed ZeRO-3 (parameters sharded across processes).

Everything here is a no-op without ZeRO-3, so callers need no branches of their own. Under ZeRO-3
each function is collective: every process must call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def zero3_enabled(trainer: Any) -> bool:
    """Whether the trainer's strategy shards parameters (DeepSpeed ZeRO stage 3)."""
    return bool(trainer is not None and getattr(trainer.strategy, "zero_stage_3", False))


@contextlib.contextmanager
def hf_zero3_loading(trainer: Any) -> Iterator[None]:
    """Lets ``from_pretrained`` load straight into ZeRO-3 shards (transformers checks that a
    HfDeepSpeedConfig is alive while it loads)."""
    if not zero3_enabled(trainer):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(trainer.strategy.config)
    try:
        yield
    finally:
        del keep_alive


def gathered(params: list[nn.Parameter], enabled: bool, modifier_rank: int | None = None):
    """Full parameters inside the context (collective); changes on ``modifier_rank`` are kept."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank, enabled=enabled)


def offloads_optimizer(trainer: Any) -> bool:
    """Whether the strategy runs the optimizer step on the CPU (DeepSpeed ZeRO-Offload)."""
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    if not isinstance(config, dict):
        return False
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in (None, "none")


@contextlib.contextmanager
def full_output_head(model: nn.Module, trainer: Any) -> Iterator[nn.Module]:
    """The output head for a whole pass. Under ZeRO-3 a full, frozen copy is gathered once
    (collective), so applying it to a different number of positions on each process needs no
    further communication; otherwise the head itself."""
    from svdecode_pl.models.heads import hf_model

    head = hf_model(model).get_output_embeddings()
    if not zero3_enabled(trainer):
        yield head
        return
    with gathered(list(head.parameters()), True):
        copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        copy = copy.to(device=head.weight.device, dtype=head.weight.dtype).requires_grad_(False)
        copy.weight.copy_(head.weight.detach())
        if head.bias is not None:
            copy.bias.copy_(head.bias.detach())
    yield copy
