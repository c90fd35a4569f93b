"""Log-likelihood scoring of continuations, plain and steered, in bounded memory.

Plain torch + transformers: no Lightning. The model's head is applied only at the positions
that predict target tokens, ``chunk_tokens`` positions at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdecode_pl.modeling import adapter_disabled, hf_model, hidden_states_as_logits
from svdecode_pl.steering import SteeringVector


def chunked_logits(head: nn.Module, hidden: torch.Tensor, chunk_tokens: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 logits of (N, H) hidden states, ``chunk_tokens`` rows at a time."""
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
        yield rows, head(hidden[rows]).float()


def logits_into(head: nn.Module, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Float32 logits of (N, H) hidden states written into ``out`` (N, V): a linear head in
    float32 writes them there directly, so a loop over chunks allocates nothing of size V
    (fresh multi-MB tensors cost page faults on every chunk)."""
    if isinstance(head, nn.Linear) and head.weight.dtype == hidden.dtype == out.dtype:
        torch.mm(hidden, head.weight.t(), out=out)
        return out if head.bias is None else out.add_(head.bias)
    return out.copy_(head(hidden))


def target_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Final hidden states at the positions that predict target tokens, with the targets.

    Returns ((N, H) hidden states, (N,) target ids, the output head). Virtual tokens that a
    prompt-learning adapter puts in front of the sequence are dropped, so adapted and base
    outputs are aligned to the same real tokens.
    """
    with hidden_states_as_logits(model) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]
    predict = target_mask[:, 1:].bool()
    return hidden[:, :-1][predict], input_ids[:, 1:][predict], head


@dataclass
class TokenScores:
    """Log-probabilities of target tokens, without and with steering."""

    plain: torch.Tensor
    steered: torch.Tensor | None


def score_tokens(
    head: nn.Module,
    adapted_hidden: torch.Tensor,
    targets: torch.Tensor,
    steering: SteeringVector | None = None,
    base_hidden: torch.Tensor | None = None,
    chunk_tokens: int = 256,
) -> TokenScores:
    """log p(target) for each of N positions, plain and (if a vector is given) steered."""
    plain = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    steered = torch.empty_like(plain) if steering is not None else None
    for rows, logits in chunked_logits(head, adapted_hidden, chunk_tokens):
        y = targets[rows].unsqueeze(-1)
        plain[rows] = torch.log_softmax(logits, -1).gather(-1, y).squeeze(-1)
        if steering is not None:
            base = head(base_hidden[rows]).float() if steering.needs_base_logits else None
            steered[rows] = torch.log_softmax(steering.steer(logits, base), -1).gather(-1, y).squeeze(-1)
    return TokenScores(plain, steered)


class PrefixCache:
    """Keys and values of a token prefix shared by many contexts (the QA primer), computed once
    per model state ("adapted" / "base") and copied for each context that starts with it."""

    def __init__(self) -> None:
        self._ids: tuple[int, ...] | None = None
        self._caches: dict[str, Any] = {}

    def get(self, model: nn.Module, prefix_ids: list[int], state: str, device: torch.device) -> Any:
        if tuple(prefix_ids) != self._ids:
            self._ids, self._caches = tuple(prefix_ids), {}
        if state not in self._caches:
            with hidden_states_as_logits(model):
                out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
            self._caches[state] = out.past_key_values
        return copy.deepcopy(self._caches[state])


@torch.no_grad()
def score_many(
    model: nn.Module,
    contexts: list[list[int]],
    continuations: list[list[list[int]]],
    steering: SteeringVector | None = None,
    chunk_tokens: int = 256,
    pad_id: int = 0,
    prefix: PrefixCache | None = None,
    prefix_len: int = 0,
    max_rows: int = 64,
) -> list[TokenScores]:
    """Sum of token log-probabilities of every continuation of every context.

    Each (context, continuation) pair is a row; rows are sorted by length and run ``max_rows``
    at a time, right-padded (a causal model's real tokens never attend to later pads, so no
    mask is needed). With a ``prefix`` cache, the first ``prefix_len`` tokens, which all
    contexts share (the QA primer), are encoded once and each row attends to their cached
    keys and values; only the rest of the context and the continuation run per row.
    """
    device = next(model.parameters()).device
    if any(len(c) == 0 for conts in continuations for c in conts):
        raise ValueError("a continuation has no tokens")
    use_prefix = prefix is not None and prefix_len > 0 and all(len(c) > prefix_len for c in contexts)
    skip = prefix_len if use_prefix else 0
    rows = [(q, a) for q, conts in enumerate(continuations) for a in range(len(conts))]
    rows.sort(key=lambda qa: len(contexts[qa[0]]) + len(continuations[qa[0]][qa[1]]))
    plain = [torch.zeros(len(c), dtype=torch.float64) for c in continuations]
    steered = [torch.zeros(len(c), dtype=torch.float64) for c in continuations] if steering is not None else None
    head = hf_model(model).get_output_embeddings()

    def hidden_of(ids: torch.Tensor, state: str) -> torch.Tensor:
        with hidden_states_as_logits(model):
            if use_prefix:
                cache = prefix.get(model, contexts[0][:prefix_len], state, device)
                cache.batch_repeat_interleave(ids.shape[0])
                return hf_model(model)(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out = model(input_ids=ids, use_cache=False).logits
            return out[:, out.shape[1] - ids.shape[1] :]  # drop prompt-tuning virtual tokens

    for start in range(0, len(rows), max_rows):
        group = rows[start : start + max_rows]
        seqs = [contexts[q][skip:] + continuations[q][a] for q, a in group]
        ids = torch.full((len(group), max(map(len, seqs))), pad_id, device=device)
        predict = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for row, ((q, _), seq) in enumerate(zip(group, seqs)):
            ids[row, : len(seq)] = torch.tensor(seq, device=device)
            first = len(contexts[q]) - skip - 1  # the position predicting the first continuation token
            predict[row, first : len(seq) - 1] = True
        targets = ids[:, 1:][predict[:, :-1]]
        adapted = hidden_of(ids, "adapted")[predict]
        base = None
        if steering is not None and steering.needs_base_logits:
            with adapter_disabled(model):
                base = hidden_of(ids, "base")[predict]
        scores = score_tokens(head, adapted, targets, steering, base, chunk_tokens)
        owner = torch.arange(len(group), device=device)[:, None].expand_as(predict)[predict]
        sums = [torch.zeros(len(group), dtype=torch.float64, device=device).index_add_(0, owner, v.double())
                for v in (scores.plain, scores.steered) if v is not None]
        for row, (q, a) in enumerate(group):
            plain[q][a] = sums[0][row]
            if steered is not None:
                steered[q][a] = sums[1][row]
    return [TokenScores(plain[q], None if steered is None else steered[q]) for q in range(len(contexts))]


def score_continuations(
    model: nn.Module,
    context_ids: list[int],
    continuation_ids: list[list[int]],
    steering: SteeringVector | None = None,
    chunk_tokens: int = 256,
    pad_id: int = 0,
) -> TokenScores:
    """Sum of token log-probabilities of each continuation after one context, shape (A,)."""
    return score_many(model, [context_ids], [continuation_ids], steering, chunk_tokens, pad_id)[0]
