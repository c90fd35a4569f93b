"""How each kind of evaluation item is scored and which metrics it feeds.

An item comes from a data module's test/predict loader; its ``kind`` picks the task here.
Scoring is plain torch (see :mod:`svdecode_pl.scoring`), so this runs without Lightning too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from svdecode_pl.metrics import accuracy_score, mc1_score, mc2_score, mc3_score
from svdecode_pl.scoring import score_continuations
from svdecode_pl.steering import SteeringVector

#: metric names of each task, in the order they are reported
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc": ("mc1", "mc2", "mc3"),
    "multiple_choice": ("accuracy",),
}


def score_item(
    model: nn.Module, item: dict[str, Any], steering: SteeringVector | None, chunk_tokens: int, pad_id: int
) -> dict[str, Any]:
    """Score every answer of one item, plain and steered; returns a JSON-ready record."""
    scores = score_continuations(model, item["context_ids"], item["continuation_ids"], steering, chunk_tokens, pad_id)
    record = {
        "uid": item["uid"],
        "id": item["id"],
        "answers": item["answers"],
        "scores": {"plain": scores.plain.tolist(), "steered": None if scores.steered is None else scores.steered.tolist()},
    }
    for variant in ("plain", "steered"):
        values = getattr(scores, variant)
        record.setdefault("metrics", {})[variant] = None if values is None else item_metrics(item, values)
        record.setdefault("choice", {})[variant] = None if values is None else item["answers"][int(values.argmax())]
    if item["kind"] == "truthfulqa_mc":  # the MC1 choice is the answer picked among the MC1 set
        for variant in ("plain", "steered"):
            values = getattr(scores, variant)
            if values is not None:
                mc1 = values[item["mc1_index"]]
                record["choice"][variant] = item["answers"][item["mc1_index"][int(mc1.argmax())]]
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
