"""Beam search for dynamic steering: transformers 5's ``_beam_search`` scoring, over the steered step.

Beams rank by cumulative steered log-probabilities, log_softmax(z_phi + mu*delta_z) summed over the
tokens (a zero ``mu`` gives ``generate(num_beams=k)``'s tokens, token for token); finished
hypotheses by that sum over ``length ** length_penalty``; the early-stop heuristic, the candidates
kept per step (``max(2, 1 + #EOS) * k``) and the ``-1e9`` masks are transformers'. After every
step both model states' KV caches are reordered with the surviving beams (``streams.reorder``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria

from svdecode_pl.decoding.settings import (
    BEAM_EARLY_STOPPING,
    BEAM_LENGTH_PENALTY,
    GenerationSettings,
    sampling_warpers,
)
from svdecode_pl.steering.vector import SteeringVector

_NEG = -1.0e9


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j]]`` along the beam dimension (transformers' ``_gather_beams``)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def eos_ids_of(criteria: StoppingCriteriaList) -> list[int]:
    """The EOS ids the criteria stop at (what ``generate`` sizes its kept candidates by)."""
    return [int(t) for c in criteria if isinstance(c, EosTokenCriteria) for t in c.eos_token_id.flatten()]


@dataclass
class Beams:
    """Running and finished hypotheses of a (batch, beams) search, as ``_beam_search`` holds them."""

    running: torch.Tensor  # (B, k, max_length) ids
    running_scores: torch.Tensor  # (B, k) cumulative log-probs
    finished: torch.Tensor  # (B, k, max_length) ids
    finished_scores: torch.Tensor  # (B, k) length-penalised
    finished_lengths: torch.Tensor  # (B, k) generated tokens of each finished hypothesis
    is_finished: torch.Tensor  # (B, k)
    improvable: torch.Tensor  # (B, 1): the early-stop heuristic is not yet satisfied

    @classmethod
    def start(cls, input_ids: torch.Tensor, beams: int, max_length: int, fill: int) -> Beams:
        batch, length = input_ids.shape[0] // beams, input_ids.shape[1]
        running = input_ids.new_full((batch, beams, max_length), fill)
        running[:, :, :length] = input_ids.view(batch, beams, length)
        scores = torch.zeros(batch, beams, device=input_ids.device)
        scores[:, 1:] = _NEG  # only the first beam's tokens count at the first step
        bools = torch.zeros(batch, beams, dtype=torch.bool, device=input_ids.device)
        return cls(running, scores, running.clone(), torch.full_like(scores, _NEG), torch.zeros_like(running[..., 0]),
                   bools, torch.ones(batch, 1, dtype=torch.bool, device=input_ids.device))


def _candidates(accumulated: torch.Tensor, keep: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best (or sampled without replacement) continuations: (scores, flat indices), best first."""
    if not sample:
        return torch.topk(accumulated, k=keep)
    indices = torch.multinomial(torch.softmax(accumulated, dim=-1), num_samples=keep)
    scores, order = torch.gather(accumulated, 1, indices).sort(dim=-1, descending=True)
    return scores, indices.gather(-1, order)


def _finish(state: Beams, candidates: torch.Tensor, scores: torch.Tensor, hits: torch.Tensor, generated: int) -> None:
    """Merge the candidates that just hit a stopping criterion into the finished hypotheses
    (transformers' ``_update_finished_beams``): only the top ``k`` candidates qualify."""
    beams = state.running.shape[1]
    just_finished = hits.clone()
    just_finished[:, beams:] = False
    scores = scores / (generated**BEAM_LENGTH_PENALTY)
    full = torch.all(state.is_finished, dim=-1, keepdim=True) & (BEAM_EARLY_STOPPING is True)
    scores = scores + full.float() * _NEG + (~state.improvable).float() * _NEG + (~just_finished).float() * _NEG
    merged_scores = torch.cat((state.finished_scores, scores), dim=1)
    best = torch.topk(merged_scores, k=beams)[1]
    lengths = torch.full_like(scores, generated, dtype=state.finished_lengths.dtype)
    state.finished = _gather(torch.cat((state.finished, candidates), dim=1), best)
    state.finished_scores = _gather(merged_scores, best)
    state.finished_lengths = _gather(torch.cat((state.finished_lengths, lengths), dim=1), best)
    state.is_finished = _gather(torch.cat((state.is_finished, just_finished), dim=1), best)


def _still_improvable(state: Beams, generated: int, new_tokens: int) -> torch.Tensor:
    """transformers' ``_check_early_stop_heuristic`` after ``generated`` tokens."""
    never = BEAM_EARLY_STOPPING == "never" and BEAM_LENGTH_PENALTY > 0.0
    best_running = state.running_scores[:, :1] / ((new_tokens if never else generated) ** BEAM_LENGTH_PENALTY)
    worst_finished = torch.where(state.is_finished, torch.min(state.finished_scores, dim=1, keepdim=True)[0], _NEG)
    return state.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def beam_search(
    advance: Callable[[torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor, settings: GenerationSettings, steering: SteeringVector,
    criteria: StoppingCriteriaList, pad_id: int, record: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """(B, L + new) ids: the best beam of each prompt. ``input_ids``: (B*k, L), each prompt repeated k times;
    ``advance(tokens, beam_idx)``: reorder both caches by ``beam_idx``, feed one token per beam and return the
    (adapted, base) float32 logits (``advance(None, None)``: the prefill's)."""
    beams, (rows, length) = settings.num_beams, input_ids.shape
    batch, vocab_rows = rows // beams, torch.arange(rows // beams, device=input_ids.device)[:, None] * beams
    eos = eos_ids_of(criteria)
    keep = max(2, 1 + len(eos)) * beams
    fill = (pad_id or eos[0]) if eos else -1  # generate's ``pad_token_id or eos_token_id[0]``
    warpers = sampling_warpers(settings, min_tokens_to_keep=len(eos) + 1 if eos else 2) if settings.do_sample else None
    state = Beams.start(input_ids, beams, length + settings.max_new_tokens, fill)
    adapted, base = advance(None, None)
    cur = length
    while True:
        if record is not None:
            record(adapted, base)
        log_probs = torch.log_softmax(steering.steer(adapted, base), dim=-1)
        if warpers is not None:
            log_probs = warpers(state.running[:, :, :cur].reshape(rows, cur), log_probs)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.view(batch, beams, vocab) + state.running_scores[:, :, None]).view(batch, -1)
        scores, indices = _candidates(accumulated, keep, settings.do_sample)
        parents = torch.div(indices, vocab, rounding_mode="floor")
        candidates = _gather(state.running, parents)
        candidates[:, :, cur] = indices % vocab
        hits = criteria(candidates[:, :, : cur + 1].reshape(batch * keep, cur + 1), None).view(batch, keep)
        running_scores = scores + hits.float() * _NEG
        survivors = torch.topk(running_scores, k=beams)[1]
        state.running, state.running_scores = _gather(candidates, survivors), _gather(running_scores, survivors)
        _finish(state, candidates, scores, hits, cur + 1 - length)
        cur += 1
        state.improvable = _still_improvable(state, cur - length, settings.max_new_tokens)
        all_full = bool(torch.all(state.is_finished)) and BEAM_EARLY_STOPPING is True
        if not bool(torch.any(state.improvable)) or all_full or bool(torch.all(hits)):
            break
        beam_idx = (_gather(parents, survivors) + vocab_rows).flatten()
        adapted, base = advance(state.running[:, :, cur - 1].flatten(), beam_idx)
    return state.finished[:, 0, : length + int(state.finished_lengths[:, 0].max())]
