"""Compiled decoding: a static KV cache and a ``torch.compile``'d step.

At batch 1 a GPU's decoding step is bound by Python and kernel launches, not by its FLOPs or its
memory: a 1.5B model's step launches hundreds of small kernels. With a static cache every step has
the same shapes (one token per row, a key/value buffer of fixed length, a fixed-width mask), so the
step compiles once and, on a GPU (``mode="reduce-overhead"``), replays as one CUDA graph.

- plain and static-steered decoding: ``generate`` with ``cache_implementation="static"`` and a
  ``CompileConfig`` (transformers compiles its decoding steps itself, the prefill stays eager);
- dynamic steering: our loop calls :func:`compiled_call` of the decoder per step, on a
  :func:`static_cache` kept per decoder and reused while its shape fits, so later batches replay
  the graphs already recorded (a new buffer would be a new static address, hence a new recording).

Whether to compile is the ``generation.compile`` setting (``auto``: on CUDA only, see
:func:`svdecode_pl.models.device_defaults.compiled_decoding_default`).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from svdecode_pl.models.heads import hf_model
from svdecode_pl.models.peft_methods import is_prompt_learning

#: Static caches are sized to a multiple of this many positions, so batches of similar lengths
#: share one shape (one compiled graph) instead of recompiling per prompt length (a TruthfulQA
#: prompt with its primer plus 256 new tokens fits 768); attention reads the whole width, masked,
#: which at these lengths costs far less than the weights each step reads.
CACHE_LENGTH_STEP = 256
_caches: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def compile_support(model: nn.Module) -> tuple[bool, str]:
    """(compilable, why not): a transformers model that declares a compilable forward (static caches
    supported), and no prompt learning, whose virtual tokens (a prefix cache, or embeddings in front
    of the batch) the static-cache loop does not model."""
    if is_prompt_learning(model):
        return False, "prompt learning (virtual tokens)"
    inner = hf_model(model)
    if not getattr(inner, "_can_compile_fullgraph", False):
        return False, f"{type(inner).__name__} does not declare a compilable forward (static cache)"
    return True, ""


def compile_mode(device: torch.device) -> str:
    """CUDA graphs on a GPU (``reduce-overhead``); inductor's kernels alone elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_config(device: torch.device) -> Any:
    """The ``CompileConfig`` of ``generate`` (which on its own compiles on accelerators only)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode=compile_mode(device))
    if device.type != "cuda":  # a switch the user set on: compile on the CPU too (the tests do)
        config._compile_all_devices = True
    return config


def cache_length(needed: int) -> int:
    """``needed`` positions rounded up to :data:`CACHE_LENGTH_STEP`."""
    return -(-needed // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP


def cache_keyword(decoder: nn.Module) -> str:
    """How the decoder's forward names its cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def static_cache(model: nn.Module, slot: str, rows: int, needed: int) -> Any:
    """An emptied static cache of ``rows`` rows holding at least ``needed`` positions, for one model
    state (``slot``): the one of the previous call when it fits (same buffers, same graphs); else a
    new one, never shorter than the previous (as ``generate`` sizes its static caches)."""
    from transformers import StaticCache

    inner = hf_model(model)
    held = _held(inner.get_decoder())
    cache = held.get(slot)
    if cache is not None and cache_capacity(cache) >= needed and _fits(cache, rows, next(inner.parameters())):
        cache.reset()
        return cache
    length = max(cache_length(needed), cache_capacity(cache) if cache is not None else 0)
    held[slot] = StaticCache(config=inner.config.get_text_config(decoder=True), max_cache_len=length)
    return held[slot]


def _held(decoder: nn.Module) -> dict[str, Any]:
    """The static caches kept per decoder (by model state), released with the decoder."""
    return _caches.setdefault(decoder, {})


def _fits(cache: Any, rows: int, weight: torch.Tensor) -> bool:
    """Whether a used static cache has ``rows`` rows on the weights' device (a fresh one fits anything)."""
    layer = cache.layers[0]
    if not getattr(layer, "is_initialized", False):
        return True
    return int(layer.keys.shape[0]) == rows and layer.keys.device == weight.device


def cache_capacity(cache: Any) -> int:
    """Positions a static cache holds (the fixed width of its attention mask)."""
    return int(cache.layers[0].max_cache_len)


def reorder_cache(cache: Any, beam_idx: torch.Tensor) -> None:
    """Keep the cache rows of the surviving beams, in their new order (as ``generate`` does); a
    static cache in place, so its buffers keep the addresses compiled graphs read."""
    from transformers import StaticCache

    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                index = beam_idx.to(layer.keys.device)
                layer.keys.copy_(layer.keys.index_select(0, index))
                layer.values.copy_(layer.values.index_select(0, index))
        return
    if not hasattr(cache, "reorder_cache"):
        raise ValueError(f"beam search needs a reorderable KV cache, got {type(cache).__name__}")
    cache.reorder_cache(beam_idx)


def _call(decoder: nn.Module, **inputs: Any) -> Any:
    return decoder(**inputs)


_compiled: dict[str, Any] = {}


def compiled_call(device: torch.device) -> Any:
    """``compiled(decoder, **inputs)``: a decoder's call, ``torch.compile``'d once per mode (dynamo
    keeps a graph per decoder and shape, guarded, as for transformers' ``get_compiled_call``);
    holding no module, it keeps none alive."""
    mode = compile_mode(device)
    if mode not in _compiled:
        _compiled[mode] = torch.compile(_call, mode=mode, dynamic=False, fullgraph=False)
    return _compiled[mode]
