"""Evaluating items, plain and steered: choice items are scored, generation items decoded.

Plain torch (see :mod:`svdecode_pl.evaluation.scoring`): this runs without Lightning too::

    >>> evaluator = Evaluator(model, tokenizer, steering=vector)          # doctest: +SKIP
    >>> records = evaluator.evaluate(datamodule.eval_items("test"))      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from svdecode_pl.evaluation.generation import GenerationSettings, generate_texts, generate_token_ids
from svdecode_pl.evaluation.items import (
    VARIANTS,
    ChoiceItem,
    EvalItem,
    GenerationItem,
    Record,
    choice_record,
    generation_record,
)
from svdecode_pl.evaluation.scoring import score_many
from svdecode_pl.evaluation.scoring_job import PrefixCache
from svdecode_pl.steering.vector import SteeringVector


@dataclass
class ScoringSettings:
    """How log-likelihood scoring runs (the model's ``chunk_tokens`` and ``score_batch_tokens``)."""

    chunk_tokens: int = 256
    """Positions whose logits are materialised at once (memory bound at large vocabularies)."""
    max_batch_tokens: int = 0
    """0: one question per forward pass (scores independent of batching); N: batches up to N padded tokens."""


@dataclass
class Evaluator:
    """A model, its tokenizer and the steering vector, with everything evaluation needs."""

    model: nn.Module
    tokenizer: Any
    steering: SteeringVector | None = None
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    generation: GenerationSettings | None = None
    """How generation items are decoded (None: greedy, no stop string, the items' ``max_new_tokens``)."""
    prefix: PrefixCache = field(default_factory=PrefixCache)
    """Keys and values of the primer all items share, computed once per model state."""
    pad_token_id: int | None = None
    """Default: the tokenizer's."""
    mu_grid: list[float] | None = None
    """Strengths at which every item is also evaluated steered (choice items: from the same forward pass)."""

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return getattr(self.tokenizer, "pad_token_id", None) or 0

    def evaluate(self, items: list[EvalItem]) -> list[Record]:
        """Records of a batch of items of one kind (choice or generation), in the items' order."""
        if all(isinstance(item, ChoiceItem) for item in items):
            return self.score(items)
        if all(isinstance(item, GenerationItem) for item in items):
            return self.generate(items)
        raise ValueError("a batch mixes items decoded by generation with items scored by log-likelihood")

    def score(self, items: list[ChoiceItem]) -> list[Record]:
        """Every answer of every item scored, plain and steered, in shared forward passes."""
        prefix_len = min(item.shared_prefix_len for item in items)
        all_scores = score_many(
            self.model, [item.context_ids for item in items], [item.continuation_ids for item in items],
            self.steering, self.scoring.chunk_tokens, self.pad_id, self.prefix, prefix_len,
            self.scoring.max_batch_tokens, mu_grid=self.grid,
        )
        return [choice_record(item, scores.plain, scores.steered, scores.grid)
                for item, scores in zip(items, all_scores)]

    @property
    def grid(self) -> list[float] | None:
        return self.mu_grid if self.steering is not None and self.mu_grid else None

    def generate(self, items: list[GenerationItem]) -> list[Record]:
        """Each item's continuation decoded plain and (with a vector) steered, then graded."""
        if self.tokenizer is None:
            raise ValueError("generation items need the tokenizer to decode the responses")
        settings = self.generation or GenerationSettings(stop=[])
        limits = {item.max_new_tokens for item in items if item.max_new_tokens is not None}
        if limits:  # items that set their own limit (commonsense: the data module's max_new_tokens)
            settings = dataclasses.replace(settings, max_new_tokens=max(limits))
        prompts = [item.context_ids for item in items]
        texts: dict[str, list[str] | None] = {variant: None for variant in VARIANTS}
        for variant, vector in (("plain", None), ("steered", self.steering)):
            if variant == "plain" or vector is not None:
                texts[variant] = generate_texts(self.model, self.tokenizer, prompts, settings, vector)
        grid_texts = None
        if self.grid:  # each strength is a decoding of its own
            grid_texts = [generate_texts(self.model, self.tokenizer, prompts, settings, self.steering.with_mu(mu))
                          for mu in self.grid]
        return [
            generation_record(item, {v: None if t is None else t[i] for v, t in texts.items()},
                              None if grid_texts is None else [texts_at[i] for texts_at in grid_texts])
            for i, item in enumerate(items)
        ]


def generate_ids(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, steering: SteeringVector | None,
    tokenizer: Any, pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of the prompts (one left-padded batch), plain or steered, each cut
    at its first EOS (excluded)."""
    return generate_token_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens, stop=[]), steering)


def score_items(
    model: nn.Module, items: list[EvalItem], steering: SteeringVector | None, chunk_tokens: int = 256,
    pad_id: int = 0, prefix: PrefixCache | None = None, tokenizer: Any = None, max_batch_tokens: int = 0,
) -> list[Record]:
    """Records of ``items`` (shorthand for :meth:`Evaluator.evaluate`)."""
    evaluator = Evaluator(model, tokenizer, steering, ScoringSettings(chunk_tokens, max_batch_tokens),
                          prefix=prefix if prefix is not None else PrefixCache(), pad_token_id=pad_id)
    return evaluator.evaluate(items)
