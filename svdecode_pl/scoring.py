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


@dataclass
class PackedRows:
    """One row per context: the context's tokens, then each continuation, all in one sequence.

    A custom attention mask lets every continuation see the context and its own earlier tokens
    only, and each continuation's positions restart where the context ends, so the row computes
    exactly what separate (context + continuation) sequences would, with the context encoded once
    and no padding between continuations.
    """

    ids: torch.Tensor  # (B, L) token ids, right-padded
    positions: torch.Tensor  # (B, L) position of each token after the context start
    segments: torch.Tensor  # (B, L) 0 = context, k + 1 = continuation k, -1 = padding
    source: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the state predicting each target
    targets: torch.Tensor  # (N,) the continuation tokens
    owner: torch.Tensor  # (N,) index of the (context, continuation) pair each target belongs to


def pack_rows(contexts: list[list[int]], continuations: list[list[list[int]]], pad_id: int, device) -> PackedRows:
    """Pack each context with all its continuations into one row (see :class:`PackedRows`)."""
    length = max(len(c) + sum(map(len, conts)) for c, conts in zip(contexts, continuations))
    ids = torch.full((len(contexts), length), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)
    rows, columns, targets, owner = [], [], [], []
    pair = 0
    for row, (context, conts) in enumerate(zip(contexts, continuations)):
        ids[row, : len(context)] = torch.tensor(context)
        positions[row, : len(context)] = torch.arange(len(context))
        segments[row, : len(context)] = 0
        at = len(context)
        for k, cont in enumerate(conts):
            span = slice(at, at + len(cont))
            ids[row, span] = torch.tensor(cont)
            positions[row, span] = torch.arange(len(context), len(context) + len(cont))
            segments[row, span] = k + 1
            # token 0 is predicted by the context's last state, token j by continuation token j - 1
            columns += [len(context) - 1, *range(at, at + len(cont) - 1)]
            rows += [row] * len(cont)
            targets += cont
            owner += [pair] * len(cont)
            at += len(cont)
            pair += 1
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PackedRows(
        ids.to(device), positions.to(device), segments.to(device), (as_tensor(rows), as_tensor(columns)),
        as_tensor(targets), as_tensor(owner),
    )


def packed_attention_mask(segments: torch.Tensor, past_length: int, dtype: torch.dtype | None) -> torch.Tensor:
    """(B, 1, L, past + L) mask: all tokens see the cached prefix; a token sees earlier tokens of
    the context and of its own continuation. Padding sees itself (no empty softmax rows).
    ``dtype=None`` gives a boolean mask (SDPA), a float dtype an additive one (eager attention)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((key == 0) | (key == query)) & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    past = torch.ones(*allowed.shape[:2], past_length, dtype=torch.bool, device=segments.device)
    mask = torch.cat([past, allowed], dim=-1)[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def packs_rows(model: nn.Module) -> bool:
    """Whether this model's attention takes the custom masks of :class:`PackedRows`."""
    return getattr(hf_model(model).config, "_attn_implementation", None) in ("sdpa", "eager")


def is_prompt_learning(model: nn.Module) -> bool:
    """Prompt Tuning, P-Tuning, Prefix Tuning: the adapter adds virtual tokens in front of the input."""
    from peft import PeftModel

    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


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
    max_batch_tokens: int = 0,
) -> list[TokenScores]:
    """Sum of token log-probabilities of every continuation of every context.

    With a ``prefix`` cache, the first ``prefix_len`` tokens, which all contexts share (the QA
    primer), are encoded once per model state and every row attends to their cached keys and
    values. Each context is then packed with all its continuations into one row (see
    :class:`PackedRows`), so it is encoded once too; rows are sorted by length and batched up to
    ``max_batch_tokens`` padded tokens (0: one context per pass, so a score does not depend on
    which contexts share the call). Attention implementations that take no custom mask
    (e.g. flash attention) run one right-padded row per (context, continuation) pair instead.
    """
    if any(len(c) == 0 for conts in continuations for c in conts):
        raise ValueError("a continuation has no tokens")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("a context has no tokens (the first continuation token needs one to predict it)")
    use_prefix = prefix is not None and prefix_len > 0 and all(len(c) > prefix_len for c in contexts)
    if packs_rows(model) and (use_prefix or not is_prompt_learning(model)):
        return score_packed(model, contexts, continuations, steering, chunk_tokens, pad_id,
                            prefix if use_prefix else None, prefix_len if use_prefix else 0, max_batch_tokens)
    return score_padded(model, contexts, continuations, steering, chunk_tokens, pad_id,
                        prefix if use_prefix else None, prefix_len if use_prefix else 0, max_batch_tokens)


def score_packed(
    model: nn.Module,
    contexts: list[list[int]],
    continuations: list[list[list[int]]],
    steering: SteeringVector | None,
    chunk_tokens: int,
    pad_id: int,
    prefix: PrefixCache | None,
    prefix_len: int,
    max_batch_tokens: int,
) -> list[TokenScores]:
    """:func:`score_many` with one packed row per context."""
    device = next(model.parameters()).device
    inner = hf_model(model)
    mask_dtype = None if inner.config._attn_implementation == "sdpa" else inner.dtype
    head = inner.get_output_embeddings()
    order = sorted(range(len(contexts)), key=lambda q: len(contexts[q]) + sum(map(len, continuations[q])))
    plain = [torch.zeros(len(c), dtype=torch.float64) for c in continuations]
    steered = [torch.zeros(len(c), dtype=torch.float64) for c in continuations] if steering is not None else None

    def hidden_of(rows: PackedRows, state: str) -> torch.Tensor:
        cache, past = None, 0
        if prefix is not None:
            cache = prefix.get(model, contexts[0][:prefix_len], state, device)
            cache.batch_repeat_interleave(rows.ids.shape[0])
            past = cache.get_seq_length()
        with hidden_states_as_logits(model):
            out = inner(
                input_ids=rows.ids, attention_mask=packed_attention_mask(rows.segments, past, mask_dtype),
                position_ids=rows.positions + past, past_key_values=cache, use_cache=cache is not None,
            ).logits
        return out[rows.source]

    for group in length_batches(order, lambda q: len(contexts[q]) + sum(map(len, continuations[q])), max_batch_tokens):
        rows = pack_rows([contexts[q][prefix_len:] for q in group], [continuations[q] for q in group], pad_id, device)
        adapted = hidden_of(rows, "adapted")
        base = None
        if steering is not None and steering.needs_base_logits:
            with adapter_disabled(model):
                base = hidden_of(rows, "base")
        scores = score_tokens(head, adapted, rows.targets, steering, base, chunk_tokens)
        pairs = [(q, a) for q in group for a in range(len(continuations[q]))]
        sums = [torch.zeros(len(pairs), dtype=torch.float64, device=device).index_add_(0, rows.owner, v.double()).cpu()
                for v in (scores.plain, scores.steered) if v is not None]
        for index, (q, a) in enumerate(pairs):
            plain[q][a] = sums[0][index]
            if steered is not None:
                steered[q][a] = sums[1][index]
    return [TokenScores(plain[q], None if steered is None else steered[q]) for q in range(len(contexts))]


def length_batches(order: list[int], length, max_batch_tokens: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (ascending ``length``) whose padded size, count times the
    last item's length, stays within ``max_batch_tokens`` (a longer item is a batch of its own)."""
    group: list[int] = []
    for index in order:
        if group and (len(group) + 1) * length(index) > max_batch_tokens:
            yield group
            group = []
        group.append(index)
    if group:
        yield group


def score_padded(
    model: nn.Module,
    contexts: list[list[int]],
    continuations: list[list[list[int]]],
    steering: SteeringVector | None,
    chunk_tokens: int,
    pad_id: int,
    prefix: PrefixCache | None,
    prefix_len: int,
    max_batch_tokens: int,
) -> list[TokenScores]:
    """:func:`score_many` with one right-padded row per (context, continuation) pair: a causal
    model's real tokens never attend to later pads, so no mask is needed."""
    device = next(model.parameters()).device
    pairs = [(q, a) for q, conts in enumerate(continuations) for a in range(len(conts))]
    length = lambda qa: len(contexts[qa[0]]) - prefix_len + len(continuations[qa[0]][qa[1]])  # noqa: E731
    order = sorted(range(len(pairs)), key=lambda i: length(pairs[i]))
    plain = [torch.zeros(len(c), dtype=torch.float64) for c in continuations]
    steered = [torch.zeros(len(c), dtype=torch.float64) for c in continuations] if steering is not None else None
    head = hf_model(model).get_output_embeddings()

    def hidden_of(ids: torch.Tensor, state: str) -> torch.Tensor:
        with hidden_states_as_logits(model):
            if prefix is not None:
                cache = prefix.get(model, contexts[0][:prefix_len], state, device)
                cache.batch_repeat_interleave(ids.shape[0])
                return hf_model(model)(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out = model(input_ids=ids, use_cache=False).logits
            return out[:, out.shape[1] - ids.shape[1] :]  # drop prompt-tuning virtual tokens

    for batch in length_batches(order, lambda i: length(pairs[i]), max_batch_tokens):
        group = [pairs[i] for i in batch]
        seqs = [contexts[q][prefix_len:] + continuations[q][a] for q, a in group]
        ids = torch.full((len(group), max(map(len, seqs))), pad_id, device=device)
        predict = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for row, ((q, _), seq) in enumerate(zip(group, seqs)):
            ids[row, : len(seq)] = torch.tensor(seq, device=device)
            first = len(contexts[q]) - prefix_len - 1  # the position predicting the first continuation token
            predict[row, first : len(seq) - 1] = True
        targets = ids[:, 1:][predict[:, :-1]]
        adapted = hidden_of(ids, "adapted")[predict]
        base = None
        if steering is not None and steering.needs_base_logits:
            with adapter_disabled(model):
                base = hidden_of(ids, "base")[predict]
        scores = score_tokens(head, adapted, targets, steering, base, chunk_tokens)
        owner = torch.arange(len(group), device=device)[:, None].expand_as(predict)[predict]
        sums = [torch.zeros(len(group), dtype=torch.float64, device=device).index_add_(0, owner, v.double()).cpu()
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
