"""Evaluating items, plain and steered: choice items are scored, generation items decoded.

Plain torch (see :mod:`svdecode_pl.scoring.loglik`): this runs without Lightning too::

    >>> settings = EvaluationSettings(generation=datamodule.generation_settings())  # doctest: +SKIP
    >>> settings = settings.with_steering(SteeringVector.load("runs/quickstart/steering"))  # doctest: +SKIP
    >>> evaluator = Evaluator(model, tokenizer, settings)                          # doctest: +SKIP
    >>> records = evaluator.evaluate(datamodule.eval_items("test"))      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from svdecode_pl.decoding.generation import GenerationSettings, generate_texts, generate_token_ids
from svdecode_pl.evaluation.items import (
    VARIANTS,
    ChoiceItem,
    EvalItem,
    GenerationItem,
    Record,
    choice_record,
    generation_record,
)
from svdecode_pl.evaluation.judges import JudgePanel
from svdecode_pl.evaluation.settings import EvaluationSettings, ScoringSettings
from svdecode_pl.scoring.job import PrefixCache
from svdecode_pl.scoring.loglik import score_many
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.allocator import release_freed_memory


@dataclass
class Evaluator:
    """A model and its tokenizer with the :class:`EvaluationSettings` of a run: records of items,
    plain and steered (then judged, when the settings name judges)."""

    model: nn.Module
    tokenizer: Any
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    prefix: PrefixCache = field(default_factory=PrefixCache)
    """Keys and values of the primer all items share, computed once per model state."""
    pad_token_id: int | None = None
    """Default: the tokenizer's."""
    judges: JudgePanel | None = None
    """Loaded on first use from ``settings.judges``, kept for the evaluator's life."""

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return getattr(self.tokenizer, "pad_token_id", None) or 0

    @property
    def steering(self) -> SteeringVector | None:
        return self.settings.steering.vector

    def evaluate(self, items: list[EvalItem], device: torch.device | str = "cpu") -> list[Record]:
        """Records of a batch of items of one kind (choice or generation), in the items' order. The
        heap's free holes go back to the system past a bound, so memory does not drift with the
        number of batches (:func:`~svdecode_pl.utils.allocator.release_freed_memory`)."""
        if all(isinstance(item, ChoiceItem) for item in items):
            records = self.score(items)
        elif all(isinstance(item, GenerationItem) for item in items):
            records = self.judge(self.generate(items), device)
        else:
            raise ValueError("a batch mixes items decoded by generation with items scored by log-likelihood")
        release_freed_memory()
        return records

    def score(self, items: list[ChoiceItem]) -> list[Record]:
        """Every answer of every item scored, plain and steered, in shared forward passes."""
        prefix_len = min(item.shared_prefix_len for item in items)
        scoring = self.settings.scoring
        all_scores = score_many(
            self.model, [item.context_ids for item in items], [item.continuation_ids for item in items],
            self.steering, scoring.chunk_tokens, self.pad_id, self.prefix, prefix_len,
            scoring.score_batch_tokens, candidates=self.settings.steering.grid,
        )
        return [choice_record(item, scores.plain, scores.steered, scores.grid)
                for item, scores in zip(items, all_scores)]

    def generate(self, items: list[GenerationItem]) -> list[Record]:
        """Each item's continuation decoded plain and (with a vector) steered, then graded."""
        if self.tokenizer is None:
            raise ValueError("generation items need the tokenizer to decode the responses")
        settings = self.settings.generation or GenerationSettings(stop=[])
        limits = {item.max_new_tokens for item in items if item.max_new_tokens is not None}
        if limits:  # items that carry their own limit (commonsense: the data module's max_new_tokens)
            settings = dataclasses.replace(settings, max_new_tokens=max(limits))
        prompts = [item.context_ids for item in items]
        texts: dict[str, list[str] | None] = {variant: None for variant in VARIANTS}
        for variant, vector in (("plain", None), ("steered", self.steering)):
            if variant == "plain" or vector is not None:
                texts[variant] = generate_texts(self.model, self.tokenizer, prompts, settings, vector)
        grid = self.settings.steering.grid
        grid_texts = None
        if grid:  # each candidate is a decoding of its own; the steered one is already decoded
            steered = Candidate(self.steering.mode, self.steering.mu)
            grid_texts = [texts["steered"] if candidate == steered else
                          generate_texts(self.model, self.tokenizer, prompts, settings, self.steering.at(candidate))
                          for candidate in grid]
        return [
            generation_record(item, {v: None if t is None else t[i] for v, t in texts.items()},
                              None if grid_texts is None else [texts_at[i] for texts_at in grid_texts])
            for i, item in enumerate(items)
        ]

    def judge(self, records: list[Record], device: torch.device | str = "cpu") -> list[Record]:
        """The configured judges score the generated answers (the evaluation's last step)."""
        if self.settings.judges is None:
            return records
        if self.judges is None:
            self.judges = JudgePanel(self.settings.judges, device)
        return self.judges.score(records)


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
    settings = EvaluationSettings(ScoringSettings(chunk_tokens, max_batch_tokens)).with_steering(steering)
    evaluator = Evaluator(model, tokenizer, settings, prefix if prefix is not None else PrefixCache(), pad_id)
    return evaluator.evaluate(items)
