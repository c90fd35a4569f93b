"""How each kind of evaluation item is scored and which metrics it feeds.

An item comes from a data module's test/predict loader; its ``kind`` picks the task here.
Scoring is plain torch (see :mod:`svdecode_pl.scoring`), so this runs without Lightning too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from svdecode_pl.metrics import accuracy_score, mc1_score, mc2_score, mc3_score
from svdecode_pl.scoring import PrefixCache, TokenScores, score_many
from svdecode_pl.steering import SteeringVector

#: metric names of each task, in the order they are reported
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc": ("mc1", "mc2", "mc3"),
    "multiple_choice": ("accuracy",),
}


def score_items(
    model: nn.Module,
    items: list[dict[str, Any]],
    steering: SteeringVector | None,
    chunk_tokens: int = 256,
    pad_id: int = 0,
    prefix: PrefixCache | None = None,
) -> list[dict[str, Any]]:
    """Score every answer of the items, plain and steered, in shared batches; JSON-ready records.

    ``prefix`` caches the context tokens all items share (``item["shared_prefix_len"]``).
    """
    prefix_len = min(item.get("shared_prefix_len", 0) for item in items)
    all_scores = score_many(
        model, [item["context_ids"] for item in items], [item["continuation_ids"] for item in items],
        steering, chunk_tokens, pad_id, prefix, prefix_len,
    )
    return [mc_record(item, scores) for item, scores in zip(items, all_scores)]


def score_item(
    model: nn.Module, item: dict[str, Any], steering: SteeringVector | None, chunk_tokens: int = 256, pad_id: int = 0
) -> dict[str, Any]:
    """One item's record (see :func:`score_items`)."""
    return score_items(model, [item], steering, chunk_tokens, pad_id)[0]


def mc_record(item: dict[str, Any], scores: TokenScores) -> dict[str, Any]:
    """The record of a scored multiple-choice item: answer scores, metrics and choices."""
    record = {
        "uid": item["uid"],
        "id": item["id"],
        "answers": item["answers"],
        "scores": {
            "plain": scores.plain.tolist(),
            "steered": None if scores.steered is None else scores.steered.tolist(),
        },
        "metrics": {},
        "choice": {},
    }
    for variant in ("plain", "steered"):
        values = getattr(scores, variant)
        if values is None:
            record["metrics"][variant] = record["choice"][variant] = None
            continue
        record["metrics"][variant] = item_metrics(item, values)
        # TruthfulQA: the choice is the answer picked among the MC1 set
        candidates = item.get("mc1_index", list(range(len(item["answers"]))))
        record["choice"][variant] = item["answers"][candidates[int(values[candidates].argmax())]]
    return record


def item_metrics(item: dict[str, Any], scores: torch.Tensor) -> dict[str, float]:
    """The per-item values of the task's metrics, from the (A,) answer scores."""
    if item["kind"] == "truthfulqa_mc":
        mc1 = scores[item["mc1_index"]], torch.tensor(item["mc1_labels"])
        mc2 = scores[item["mc2_index"]], torch.tensor(item["mc2_labels"])
        return {"mc1": mc1_score(*mc1), "mc2": mc2_score(*mc2), "mc3": mc3_score(*mc2)}
    if item["kind"] == "multiple_choice":
        return {"accuracy": accuracy_score(scores, torch.tensor(item["labels"]))}
    raise ValueError(f"unknown evaluation item kind {item['kind']!r}")
