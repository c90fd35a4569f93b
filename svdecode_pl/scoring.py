"""Log-likelihood scoring of continuations, plain and steered, in bounded memory.

Plain torch + transformers: no Lightning. The model's head is applied only at the positions
that predict target tokens, ``chunk_tokens`` positions at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from svdecode_pl.modeling import adapter_disabled, hf_model, hidden_states_as_logits
from svdecode_pl.steering import SteeringVector


def chunked_logits(head: nn.Module, hidden: torch.Tensor, chunk_tokens: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 logits of (N, H) hidden states, ``chunk_tokens`` rows at a time."""
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
        yield rows, head(hidden[rows]).float()


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


def _continuation_hidden(model: nn.Module, context: torch.Tensor, continuations: torch.Tensor) -> torch.Tensor:
    """(A, L, H) hidden states predicting each continuation token, the context encoded once.

    The context runs through the full (PEFT) model and its keys and values are reused for all
    A continuations, which run through the inner transformers model (the adapter's layers are
    inside it; a prompt-learning adapter's virtual tokens are already in the cache).
    """
    num = continuations.shape[0]
    with hidden_states_as_logits(model):
        out = model(input_ids=context, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(num)
        cont = hf_model(model)(input_ids=continuations, past_key_values=cache, use_cache=True).logits
    last_context = out.logits[:, -1:].expand(num, 1, -1)
    return torch.cat([last_context, cont[:, :-1]], dim=1)


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    context_ids: list[int],
    continuation_ids: list[list[int]],
    steering: SteeringVector | None = None,
    chunk_tokens: int = 256,
    pad_id: int = 0,
) -> TokenScores:
    """Sum of token log-probabilities of each continuation after the context (A,)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(c) for c in continuation_ids], device=device)
    if (lengths == 0).any():
        raise ValueError("a continuation has no tokens")
    context = torch.tensor([context_ids], device=device)
    padded = torch.full((len(continuation_ids), int(lengths.max())), pad_id, device=device)
    for i, ids in enumerate(continuation_ids):
        padded[i, : len(ids)] = torch.tensor(ids, device=device)
    # Right padding needs no mask: a causal model's real tokens never attend to later pads.
    valid = torch.arange(padded.shape[1], device=device)[None] < lengths[:, None]
    head = hf_model(model).get_output_embeddings()
    adapted = _continuation_hidden(model, context, padded)[valid]
    base = None
    if steering is not None and steering.needs_base_logits:
        with adapter_disabled(model):
            base = _continuation_hidden(model, context, padded)[valid]
    tokens = score_tokens(head, adapted, padded[valid], steering, base, chunk_tokens)
    owner = torch.arange(len(continuation_ids), device=device)[:, None].expand_as(valid)[valid]

    def per_answer(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(continuation_ids), dtype=torch.float64, device=device).index_add_(
            0, owner, values.double()
        )

    return TokenScores(per_answer(tokens.plain), None if tokens.steered is None else per_answer(tokens.steered))
