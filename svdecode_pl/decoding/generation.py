"""Decoding with or without steering, every strategy, texts cut as lm-evaluation-harness cuts them.

- no vector: plain ``generate``;
- a static vector: ``generate`` with :class:`SteeringLogitsProcessor` (greedy, sampling, beams);
- a dynamic vector: :func:`dynamic_steered_decode`, a loop of our own that runs the adapted and
  the pre-trained model once per step (LoRA: as one doubled batch), with their KV caches (greedy,
  sampling, beams: the caches reordered with the beams).

Plain and static decoding of a LoRA / IA3 model run on the adapter merged into the weights
(:mod:`.merged`, restored exactly afterwards); with ``compile`` (by default on CUDA) every strategy
decodes with a static KV cache and compiled steps (:mod:`.compiled`).

Decoding is determined by :class:`GenerationSettings` alone: a checkpoint's generation_config
cannot switch on a processor (repetition penalty, top-k 50, suppressed tokens, ...).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from svdecode_pl.decoding.compiled import cache_length, compile_config, compile_support
from svdecode_pl.decoding.dynamic import dynamic_steered_decode
from svdecode_pl.decoding.merged import merged_adapter
from svdecode_pl.decoding.settings import BEAM_EARLY_STOPPING, BEAM_LENGTH_PENALTY, GenerationSettings
from svdecode_pl.models.device_defaults import compiled_decoding_default
from svdecode_pl.models.heads import hf_model
from svdecode_pl.steering.processor import SteeringLogitsProcessor
from svdecode_pl.steering.vector import SteeringVector


class StopStringsCriteria(StoppingCriteria):
    """Per row: has the continuation's text reached one of the stop strings?

    Only the last ``window`` tokens of the continuation (never the prompt) are decoded per step,
    enough to hold any stop string completed by the newest token: each token decodes to at least
    one byte, plus one token of margin. The text is cut at the first stop string afterwards
    (:func:`cut_text`), so stopping late costs time only, never a different text.
    Stateless, so it also holds under beam search, where rows are reordered between steps.
    """

    def __init__(self, tokenizer: Any, stop: list[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_length = prompt_length
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop or input_ids.shape[1] <= self.prompt_length:
            return done
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        hits = [any(s in tail for s in self.stop) for tail in tails]
        return done.copy_(torch.tensor(hits, dtype=torch.bool))


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids: the checkpoint's generation_config ones (several for chat models) and the tokenizer's."""
    configured = hf_model(model).generation_config.eos_token_id
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the prompts, left-padded to the longest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def generation_config(settings: GenerationSettings, eos_ids: list[int], pad_id: int,
                      compiled_on: torch.device | None = None, prompt_length: int = 0) -> GenerationConfig:
    """The GenerationConfig of the settings, every value set: unset (None) fields would be
    filled from the checkpoint's generation_config or transformers' defaults (top_k=50).
    ``compiled_on`` a device: a static cache (sized in steps, so batches share compiled shapes) and
    transformers' compiled decoding steps."""
    # the warpers (temperature, top-k/p, ...) only run when sampling; set them only then, as
    # transformers warns about sampling flags without sampling
    compiled = {} if compiled_on is None else dict(
        cache_implementation="static", compile_config=compile_config(compiled_on),
        max_cache_len=cache_length(prompt_length + settings.max_new_tokens))
    warpers = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, typical_p=1.0,
                   epsilon_cutoff=0.0, eta_cutoff=0.0) if settings.do_sample else {}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, min_length=0, do_sample=settings.do_sample,
        num_beams=settings.num_beams, num_return_sequences=1, **warpers, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        length_penalty=BEAM_LENGTH_PENALTY, early_stopping=BEAM_EARLY_STOPPING, renormalize_logits=False,
        remove_invalid_values=False, guidance_scale=1.0,
        pad_token_id=pad_id, eos_token_id=eos_ids, use_cache=True, **compiled,
    )


@contextlib.contextmanager
def checkpoint_defaults_ignored(model: nn.Module) -> Iterator[None]:
    """``generate`` fills every field a config leaves None (bad_words_ids, suppress_tokens,
    sequence_bias, min_p, ...) from the model's generation_config: swap in a blank one meanwhile."""
    inner = hf_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def stopping_criteria(
    tokenizer: Any, settings: GenerationSettings, prompt_length: int, eos_ids: list[int] | None = None
) -> StoppingCriteriaList:
    """Stop strings, plus (for our own loop: ``eos_ids`` given) max new tokens and EOS, as ``generate`` has them."""
    criteria = StoppingCriteriaList([StopStringsCriteria(tokenizer, settings.stop, prompt_length)])
    if eos_ids is not None:
        criteria.append(MaxLengthCriteria(max_length=prompt_length + settings.max_new_tokens))
        if eos_ids:
            criteria.append(EosTokenCriteria(eos_token_id=eos_ids))
    return criteria


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with the global generator(s) seeded, restoring their state afterwards (no seed: as they are)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def decoding_compiled(model: nn.Module, settings: GenerationSettings, device: torch.device) -> bool:
    """``settings.compile`` resolved (``auto``: the device's default), False where the model cannot
    compile (with a warning when the user asked for it)."""
    wanted = settings.compile if isinstance(settings.compile, bool) else compiled_decoding_default(device.type)
    supported, why = compile_support(model)
    if wanted and not supported and settings.compile is True:
        warnings.warn(f"generation.compile: decoding eagerly, {why}", stacklevel=3)
    return wanted and supported


@torch.no_grad()
def generate_sequences(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: GenerationSettings,
    steering: SteeringVector | None = None,
) -> torch.Tensor:
    """(B, L + new) token ids: the left-padded prompts and what follows (pad after a row ends)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = left_padded(prompts, pad_id, device)
    eos_ids = stop_token_ids(model, tokenizer)
    compiled = decoding_compiled(model, settings, device)
    with seeded(settings.seed, device):
        if steering is not None and steering.needs_base_logits:
            criteria = stopping_criteria(tokenizer, settings, input_ids.shape[1], eos_ids)
            out = dynamic_steered_decode(model, input_ids, attention_mask, settings, steering, criteria, pad_id,
                                         compiled=compiled)
            return out.sequences
        processors = LogitsProcessorList()
        if steering is not None:
            processors.append(SteeringLogitsProcessor(steering))
        config = generation_config(settings, eos_ids, pad_id, device if compiled else None, input_ids.shape[1])
        criteria = stopping_criteria(tokenizer, settings, input_ids.shape[1])
        with checkpoint_defaults_ignored(model), merged_adapter(model, settings.merge_adapter):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                  logits_processor=processors, stopping_criteria=criteria)


def generate_token_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: GenerationSettings,
    steering: SteeringVector | None = None,
) -> list[list[int]]:
    """The generated ids of each prompt, cut before the first EOS (stop strings: see :func:`generate_texts`)."""
    sequences = generate_sequences(model, tokenizer, prompts, settings, steering)
    eos = set(stop_token_ids(model, tokenizer))
    continuations = []
    for row in sequences[:, max(map(len, prompts)) :].tolist():
        cut = next((i for i, token in enumerate(row) if token in eos), len(row))
        continuations.append(row[:cut])
    return continuations


def cut_text(text: str, stop: list[str]) -> str:
    """The text before the first stop string, as lm-eval's ``postprocess_generated_text`` cuts it."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: GenerationSettings,
    steering: SteeringVector | None = None,
) -> list[str]:
    """The continuation text of each prompt (token ids with the tokenizer's special tokens):
    decoded with ``skip_special_tokens=True``, cut at EOS and at the first stop string, as
    lm-eval's ``HFLM.generate_until`` does (which also counts the EOS text as a stop string).

    ``steering=None``: plain decoding; a static vector: ``generate`` with the steering
    processor; a dynamic one: :func:`dynamic_steered_decode`.
    """
    eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) if tokenizer.eos_token else None
    stop = settings.stop + ([eos_text] if eos_text and eos_text not in settings.stop else [])
    return [
        cut_text(tokenizer.decode(ids, skip_special_tokens=True), stop)
        for ids in generate_token_ids(model, tokenizer, prompts, settings, steering)
    ]
