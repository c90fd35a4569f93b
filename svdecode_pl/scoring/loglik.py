"""Log-likelihood scoring of continuations, plain and steered, in bounded memory.

Plain torch + transformers: no Lightning. The model's head is applied only at the positions
that predict target tokens, ``chunk_tokens`` positions at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from svdecode_pl.models.heads import hf_model
from svdecode_pl.models.peft_methods import is_prompt_learning
from svdecode_pl.scoring.job import PrefixCache, ScoringJob, TokenScores
from svdecode_pl.scoring.packing import PACK_TOKENS, score_packed, score_padded, score_segments
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector


def packs_rows(model: nn.Module) -> bool:
    """Whether this model's attention takes the custom masks of :class:`PackedRows`."""
    return getattr(hf_model(model).config, "_attn_implementation", None) in ("sdpa", "eager")


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
    pack_tokens: int = PACK_TOKENS,
    candidates: list[Candidate] | None = None,
) -> list[TokenScores]:
    """Sum of token log-probabilities of every continuation of every context.

    With a ``prefix`` cache, the first ``prefix_len`` tokens, which all contexts share (the QA
    primer), are encoded once per model state and every context attends to their cached keys
    and values. Each context is encoded once, followed by its continuations as a trie (shared
    leading tokens once; see :class:`PackedRows`). By default (``max_batch_tokens`` 0) contexts are packed one after the
    other into rows of up to ``pack_tokens`` tokens, each attending to itself only
    (:func:`score_segments`), so a score does not depend on which contexts share a pass;
    ``max_batch_tokens`` > 0 batches length-sorted rows up to that many padded tokens instead
    (float32 rounding then varies with the batch). With a ``steering`` vector, every continuation is
    also scored steered at it and at each (mode, mu) of ``candidates``. Attention implementations that take no custom
    mask (e.g. flash attention) run one right-padded row per (context, continuation) pair.
    """
    if any(len(c) == 0 for conts in continuations for c in conts):
        raise ValueError("a continuation has no tokens")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("a context has no tokens (the first continuation token needs one to predict it)")
    use_prefix = prefix is not None and prefix_len > 0 and all(len(c) > prefix_len for c in contexts)
    prefix, prefix_len = (prefix, prefix_len) if use_prefix else (None, 0)
    job = ScoringJob(model, contexts, continuations, steering, chunk_tokens, pad_id, prefix, prefix_len, candidates)
    if packs_rows(model) and (use_prefix or not is_prompt_learning(model)):
        return score_segments(job, pack_tokens) if max_batch_tokens <= 0 else score_packed(job, max_batch_tokens)
    return score_padded(job, max_batch_tokens)


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
