"""Evaluation items and scored records: what a data module hands to scoring, and what comes back.

An item is one question, typed by how it is evaluated (lm-eval's ``Instance``, in spirit):

* a :class:`ChoiceItem` is ranked by log-likelihood: one context, one continuation per answer
  (TruthfulQA MC, commonsense under ``loglik``);
* a :class:`GenerationItem` is decoded and its text graded (TruthfulQA generation, commonsense
  under ``generate``, a user's prompt/completion task).

The concrete item types live with their task (``svdecode_pl.tasks.<task>``): each computes its own
per-question metrics and fills its own fields of the record (:meth:`GenerationItem.record_fields`);
the metric names a task reports are listed by its data module
(:attr:`svdecode_pl.tasks.base.TaskDataModule.metric_names`). A record is the item's result, plain
and steered; :meth:`Record.to_json` is the one place a record becomes a JSON line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from svdecode_pl.utils.files import json_text

Variant = Literal["plain", "steered"]

VARIANTS: tuple[Variant, ...] = ("plain", "steered")


@dataclass(kw_only=True)
class EvalItem:
    """One evaluation question."""

    uid: int
    """Position in the evaluated split: orders records and de-duplicates them across processes."""
    id: str
    """The question's id in its source."""
    context_ids: list[int]
    """Prompt token ids, the tokenizer's special tokens included."""
    group: str | None = None
    """A sub-population reported on its own (a TruthfulQA category); None: none."""


@dataclass(kw_only=True)
class ChoiceItem(EvalItem):
    """Answers ranked by the summed log-probability of their tokens after the context."""

    answers: list[str]
    continuation_ids: list[list[int]]
    shared_prefix_len: int = 0
    """Leading context tokens every item of the split shares (the primer), encoded once."""

    def metrics(self, scores: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def choice(self, scores: torch.Tensor) -> str:
        """The answer picked: the best-scoring one (first on ties)."""
        return self.answers[int(scores.argmax())]


@dataclass(kw_only=True)
class GenerationItem(EvalItem):
    """A prompt whose continuation is decoded and graded."""

    max_new_tokens: int | None = None
    """This item's limit of new tokens (None: the decoding settings'); a batch decodes to its largest."""

    def grade(self, text: str) -> tuple[str | None, dict[str, float]]:
        """(the answer read from the text, or None; the per-question metrics)."""
        raise NotImplementedError

    def record_fields(self, choices: dict[str, str | None]) -> dict[str, Any]:
        """The item's own fields of its :class:`GenerationRecord` (``choices``: variant -> the answer
        read from the text); none by default."""
        return {}


@dataclass(kw_only=True)
class Record:
    """An item's result, plain and steered (``None`` where no steering vector is attached)."""

    uid: int
    id: str
    metrics: dict[str, dict[str, float] | None]
    """variant -> metric name -> per-question value."""
    group: str | None = None
    grid_metrics: list[dict[str, float]] | None = None
    """The steered metrics at each strength of the mu grid (see ``steering.mu_grid``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The record's JSON line (no newline)."""
        return json_text(self.to_dict(), ensure_ascii=False)  # NaN (a score of -inf) as null: valid JSON


@dataclass(kw_only=True)
class ChoiceRecord(Record):
    answers: list[str]
    scores: dict[str, list[float] | None]
    """variant -> summed log-probability of each answer."""
    choice: dict[str, str | None]


@dataclass(kw_only=True)
class GenerationRecord(Record):
    generation: dict[str, str | None]
    """variant -> the decoded continuation."""
    choice: dict[str, str | None] = field(default_factory=dict)
    """variant -> the answer read from the text (commonsense labels)."""
    dataset: str | None = None
    answer: str | None = None
    question: str | None = None
    judges: dict[str, dict[str, float] | None] = field(default_factory=dict)
    """variant -> judge name -> P(" yes")."""


def choice_record(
    item: ChoiceItem, plain: torch.Tensor, steered: torch.Tensor | None, grid: torch.Tensor | None = None
) -> ChoiceRecord:
    """The record of a scored choice item from its (A,) answer scores (and (G, A) at the mu grid)."""
    scores = {"plain": plain, "steered": steered}
    return ChoiceRecord(
        grid_metrics=None if grid is None else [item.metrics(row) for row in grid],
        uid=item.uid,
        id=item.id,
        group=item.group,
        answers=item.answers,
        scores={v: None if s is None else s.tolist() for v, s in scores.items()},
        metrics={v: None if s is None else item.metrics(s) for v, s in scores.items()},
        choice={v: None if s is None else item.choice(s) for v, s in scores.items()},
    )


def generation_record(
    item: GenerationItem, texts: dict[str, str | None], grid_texts: list[str] | None = None
) -> GenerationRecord:
    """The record of a decoded generation item from its texts per variant (and at the mu grid)."""
    graded = {v: None if t is None else item.grade(t) for v, t in texts.items()}
    record = GenerationRecord(
        grid_metrics=None if grid_texts is None else [item.grade(text)[1] for text in grid_texts],
        uid=item.uid,
        id=item.id,
        group=item.group,
        generation=dict(texts),
        metrics={v: None if g is None else g[1] for v, g in graded.items()},
    )
    for name, value in item.record_fields({v: None if g is None else g[0] for v, g in graded.items()}).items():
        setattr(record, name, value)
    return record
