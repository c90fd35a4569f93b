"""How each kind of evaluation item is scored and which metrics it feeds.

An item comes from a data module's test/predict loader; its ``kind`` picks the task here.
Scoring is plain torch (see :mod:`svdecode_pl.scoring`), so this runs without Lightning too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from svdecode_pl.data.answers import extract_answer
from svdecode_pl.decoding import SteeringLogitsProcessor
from svdecode_pl.metrics import accuracy_score, mc1_score, mc2_score, mc3_score
from svdecode_pl.modeling import hf_model
from svdecode_pl.scoring import PrefixCache, TokenScores, score_many
from svdecode_pl.steering import SteeringVector

#: metric names of each task, in the order they are reported
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "truthfulqa_mc": ("mc1", "mc2", "mc3"),
    "multiple_choice": ("accuracy",),
    "generate": ("accuracy",),
    # commonsense sets: also "accuracy/<set>", listed by the data module's ``metric_names``
    "commonsense": ("accuracy",),
}


def score_items(
    model: nn.Module,
    items: list[dict[str, Any]],
    steering: SteeringVector | None,
    chunk_tokens: int = 256,
    pad_id: int = 0,
    prefix: PrefixCache | None = None,
    tokenizer: Any = None,
    max_batch_tokens: int = 0,
) -> list[dict[str, Any]]:
    """Score every answer of the items, plain and steered, in shared batches; JSON-ready records.

    ``prefix`` caches the context tokens all items share (``item["shared_prefix_len"]``);
    ``max_batch_tokens`` bounds the padded size of one forward pass.
    Items of kind ``"generate"`` are decoded instead (see :func:`generate_records`, which needs
    the ``tokenizer``); a batch holds one kind or the other.
    """
    generate = [item["kind"] == "generate" for item in items]
    if any(generate):
        if not all(generate):
            raise ValueError("a batch mixes 'generate' items with items scored by log-likelihood")
        return generate_records(model, items, steering, tokenizer, pad_id)
    prefix_len = min(item.get("shared_prefix_len", 0) for item in items)
    all_scores = score_many(
        model, [item["context_ids"] for item in items], [item["continuation_ids"] for item in items],
        steering, chunk_tokens, pad_id, prefix, prefix_len, max_batch_tokens,
    )
    return [mc_record(item, scores) for item, scores in zip(items, all_scores)]


def score_item(
    model: nn.Module, item: dict[str, Any], steering: SteeringVector | None, chunk_tokens: int = 256, pad_id: int = 0,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """One item's record (see :func:`score_items`)."""
    return score_items(model, [item], steering, chunk_tokens, pad_id, tokenizer=tokenizer)[0]


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
        return per_dataset({"accuracy": accuracy_score(scores, torch.tensor(item["labels"]))}, item)
    raise ValueError(f"unknown evaluation item kind {item['kind']!r}")


def per_dataset(metrics: dict[str, float], item: dict[str, Any]) -> dict[str, float]:
    """An item of a named set (``item["dataset"]``) also feeds ``<metric>/<set>``."""
    if "dataset" not in item:
        return metrics
    return {**metrics, **{f"{name}/{item['dataset']}": value for name, value in metrics.items()}}


# -- generation -----------------------------------------------------------------------------


def greedy_config(model: nn.Module, tokenizer: Any, max_new_tokens: int, pad_id: int) -> GenerationConfig:
    """Greedy decoding with every logits processor a checkpoint's generation_config could switch
    on set to its neutral value: the steering processor then sees the raw logits (transformers
    runs a caller's processors after its own)."""
    eos = hf_model(model).generation_config.eos_token_id
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, temperature=1.0, top_p=1.0, top_k=50,
        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id if eos is None else eos,
    )


@torch.no_grad()
def generate_ids(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, steering: SteeringVector | None,
    tokenizer: Any, pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of the prompts (one left-padded batch), plain or steered, each cut
    at its first EOS (excluded)."""
    device = next(model.parameters()).device
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, device=device)
        attention_mask[row, length - len(ids) :] = 1
    config = greedy_config(model, tokenizer, max_new_tokens, pad_id)
    processors = []
    if steering is not None:
        base = model if steering.needs_base_logits else None
        processors.append(SteeringLogitsProcessor(steering, base_model=base, attention_mask=attention_mask))
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
        logits_processor=LogitsProcessorList(processors),
    )
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    continuations = []
    for row in out[:, length:].tolist():
        cut = next((i for i, token in enumerate(row) if token in eos), len(row))
        continuations.append(row[:cut])
    return continuations


def generate_records(
    model: nn.Module, items: list[dict[str, Any]], steering: SteeringVector | None, tokenizer: Any, pad_id: int = 0,
) -> list[dict[str, Any]]:
    """Greedy responses to ``"generate"`` items, plain and (with a vector) steered, graded as
    LLM-Adapters grades them: the label extracted from the text must equal the gold label."""
    if tokenizer is None:
        raise ValueError("'generate' items need the tokenizer to decode the responses")
    max_new = max(item["max_new_tokens"] for item in items)
    prompts = [item["context_ids"] for item in items]
    texts: dict[str, list[str] | None] = {"plain": None, "steered": None}
    for variant, vector in (("plain", None), ("steered", steering)):
        if variant == "steered" and steering is None:
            continue
        ids = generate_ids(model, prompts, max_new, vector, tokenizer, pad_id)
        texts[variant] = [
            tokenizer.decode(row[: item["max_new_tokens"]], skip_special_tokens=True) for row, item in zip(ids, items)
        ]
    records = []
    for index, item in enumerate(items):
        record = {
            "uid": item["uid"],
            "id": item["id"],
            "dataset": item["dataset"],
            "answer": item["answer"],
            "generation": {},
            "choice": {},
            "metrics": {},
        }
        for variant in ("plain", "steered"):
            if texts[variant] is None:
                record["generation"][variant] = record["choice"][variant] = record["metrics"][variant] = None
                continue
            text = texts[variant][index]
            label = extract_answer(item["dataset"], text)
            record["generation"][variant] = text
            record["choice"][variant] = label
            record["metrics"][variant] = per_dataset({"accuracy": float(label == item["answer"])}, item)
        records.append(record)
    return records
