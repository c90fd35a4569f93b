"""Decoding with or without steering, every strategy, texts cut as lm-evaluation-harness cuts them.

- no vector: plain ``generate``;
- a static vector: ``generate`` with :class:`SteeringLogitsProcessor` (greedy, sampling, beams);
- a dynamic vector: :func:`dynamic_steered_decode`, a loop of our own that runs the adapted and
  the pre-trained model once per step, each with its own KV cache (greedy, sampling).

Decoding is determined by :class:`GenerationSettings` alone: a checkpoint's generation_config
cannot switch on a processor (repetition penalty, top-k 50, suppressed tokens, ...).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from svdecode_pl.decoding import SteeringLogitsProcessor
from svdecode_pl.errors import OptionError
from svdecode_pl.modeling import hf_model, hidden_states_as_logits, is_peft_model
from svdecode_pl.scoring import is_prompt_learning
from svdecode_pl.steering import SteeringVector


@dataclass
class GenerationSettings:
    """How to decode; the same settings give the same tokens, whatever the checkpoint's defaults."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt."""
    do_sample: bool = False
    """Sample from the (warped) distribution; False: greedy, or beam search with num_beams > 1."""
    temperature: float = 1.0
    """Sampling temperature (sampling only)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    num_beams: int = 1
    """Beam search with this many beams (1: off); static steering or none only."""
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    """Stop strings (lm-eval truthfulqa_gen's ``until``): the text is cut at the first one; EOS always stops."""
    seed: int | None = None
    """Sampling seed: the same seed gives the same samples (None: the global generator as it is)."""

    def __post_init__(self) -> None:
        """A bad value is the user's (``OptionError``: one line from ``svdecode``, exit status 2)."""
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.do_sample and not self.temperature > 0.0, f"sampling needs temperature > 0, got {self.temperature}"),
            (not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
            (self.num_beams < 1, f"num_beams must be >= 1, got {self.num_beams}"),
        ]
        for failed, message in problems:
            if failed:
                raise OptionError(f"generation settings: {message}")
        self.stop = list(self.stop)


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


def generation_config(settings: GenerationSettings, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The GenerationConfig of the settings, every value set: unset (None) fields would be
    filled from the checkpoint's generation_config or transformers' defaults (top_k=50)."""
    # the warpers (temperature, top-k/p, ...) only run when sampling; set them only then, as
    # transformers warns about sampling flags without sampling
    warpers = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, typical_p=1.0,
                   epsilon_cutoff=0.0, eta_cutoff=0.0) if settings.do_sample else {}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens, min_length=0, do_sample=settings.do_sample,
        num_beams=settings.num_beams, num_return_sequences=1, **warpers, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0,
        early_stopping=False, renormalize_logits=False, remove_invalid_values=False, guidance_scale=1.0,
        pad_token_id=pad_id, eos_token_id=eos_ids, use_cache=True,
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


def sampling_warpers(settings: GenerationSettings) -> LogitsProcessorList:
    """The warpers ``generate`` applies when sampling, in its order (temperature, top-k, top-p)."""
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
    return warpers


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
    with seeded(settings.seed, device):
        if steering is not None and steering.needs_base_logits:
            if settings.num_beams > 1:
                raise ValueError("dynamic steering decodes greedily or by sampling: num_beams must be 1")
            criteria = stopping_criteria(tokenizer, settings, input_ids.shape[1], eos_ids)
            out = dynamic_steered_decode(model, input_ids, attention_mask, settings, steering, criteria, pad_id)
            return out.sequences
        processors = LogitsProcessorList()
        if steering is not None:
            processors.append(SteeringLogitsProcessor(steering, log_probs=settings.num_beams > 1))
        with checkpoint_defaults_ignored(model):
            return model.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                generation_config=generation_config(settings, eos_ids, pad_id), logits_processor=processors,
                stopping_criteria=stopping_criteria(tokenizer, settings, input_ids.shape[1]),
            )


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
    processor; a dynamic one: :func:`dynamic_steered_decode` (no beams).
    """
    eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) if tokenizer.eos_token else None
    stop = settings.stop + ([eos_text] if eos_text and eos_text not in settings.stop else [])
    return [
        cut_text(tokenizer.decode(ids, skip_special_tokens=True), stop)
        for ids in generate_token_ids(model, tokenizer, prompts, settings, steering)
    ]


# -- dynamic steering: our own loop, two KV caches --------------------------------------------


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

    Prompt Tuning / P-Tuning put their virtual tokens in front of the batch (``virtual_tokens``
    columns of mask, positions counted from them, as PEFT's forward does for one unpadded row);
    Prefix Tuning puts them in the cache. The pre-trained state sees the real tokens only.
    Each pass returns the last position's final hidden states: the caller applies the output
    head to both states at once (:func:`dynamic_steered_decode`).
    """

    def __init__(self, model: nn.Module, adapted: bool, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.adapted = adapted
        self.inner = hf_model(model)
        self.prompt_learning = adapted and is_prompt_learning(model)
        self.virtual_tokens = model.active_peft_config.num_virtual_tokens if self.prompt_learning else 0
        batch = attention_mask.shape[0]
        ones = attention_mask.new_ones(batch, self.virtual_tokens)
        full = torch.cat([ones, attention_mask], dim=1)
        # generate drops an all-ones mask (no padding): do the same, for the same kernels
        self.mask: torch.Tensor | None = None if bool(attention_mask.all()) else full
        self.next_position = positions_of(full)[:, -1:] + 1
        self.prefill_positions = positions_of(full)
        self.cache: Any = None
        keep = "logits_to_keep" in inspect.signature(self.inner.forward).parameters
        self.extra = {"logits_to_keep": 1} if keep else {}
        self.switch = AdapterSwitch(model) if not adapted and is_peft_model(model) else None

    def _forward(self, **inputs: Any) -> torch.Tensor:
        switch = contextlib.nullcontext() if self.switch is None else self.switch.off()
        with switch, hidden_states_as_logits(self.model):
            # the adapted state of LoRA / IA3 runs through the PeftModel; prompt learning and the
            # base state call the transformers model (virtual tokens are handled here)
            runner = self.model if self.adapted and not self.prompt_learning else self.inner
            out = runner(attention_mask=self.mask, past_key_values=self.cache, use_cache=True, **inputs, **self.extra)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode the prompts; the last position's hidden states."""
        positions = self.prefill_positions
        if not self.prompt_learning:
            return self._forward(input_ids=input_ids, position_ids=positions)
        peft_model = self.model
        batch = input_ids.shape[0]
        if peft_model.active_peft_config.peft_type == "PREFIX_TUNING":
            self.cache = peft_model.get_prompt(batch, max_cache_len=input_ids.shape[1] + self.virtual_tokens)
            return self._forward(input_ids=input_ids, position_ids=positions[:, self.virtual_tokens :])
        embeds = self.inner.get_input_embeddings()(input_ids)
        prompts = peft_model.get_prompt(batch_size=batch).to(embeds.dtype)
        return self._forward(inputs_embeds=torch.cat([prompts, embeds], dim=1), position_ids=positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row (B,); the hidden states that predict the next one."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        hidden = self._forward(input_ids=tokens[:, None], position_ids=self.next_position)
        self.next_position = self.next_position + 1
        return hidden


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
) -> DynamicDecodeOutput:
    """Greedy or sampled decoding of a left-padded batch with steering recomputed at every step.

    Per step the adapted and the pre-trained model each run once on the new token with their
    own KV cache (no re-encoding); the output head maps both states' hidden states in one matrix
    product (its weights are read once: at a 152k vocabulary the head is most of a small
    model's step), and the token is chosen from ``steering.steer(adapted, base)``
    as ``generate`` would choose it from logits (same warpers, same ``multinomial`` draw, pad
    after a row has stopped), so a zero ``mu`` gives ``generate``'s tokens.
    """
    if settings.num_beams != 1:
        raise ValueError("dynamic steering decodes greedily or by sampling: num_beams must be 1")
    warpers = sampling_warpers(settings) if settings.do_sample else LogitsProcessorList()
    adapted_stream = CachedStream(model, True, attention_mask)
    base_stream = CachedStream(model, False, attention_mask)
    head = hf_model(model).get_output_embeddings()
    batch = input_ids.shape[0]

    def logits_of(adapted_hidden: torch.Tensor, base_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(torch.cat([adapted_hidden, base_hidden])).float()
        return logits[:batch], logits[batch:]

    adapted, base = logits_of(adapted_stream.prefill(input_ids), base_stream.prefill(input_ids))
    output = DynamicDecodeOutput(input_ids)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    pad_eos = any(hasattr(c, "eos_token_id") for c in criteria)
    sequences = input_ids
    while True:
        if keep_logits:
            output.adapted_logits.append(adapted.clone())
            output.base_logits.append(base.clone())
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
        adapted, base = logits_of(adapted_stream.step(tokens), base_stream.step(tokens))
    output.sequences = sequences
    return output
