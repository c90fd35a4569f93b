"""Token scores of one forward pass, plain, steered and at each (mode, mu) candidate of the grid,
summed per (context, continuation) pair; and the cached primer every context shares."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from svdecode_pl.models.heads import adapter_disabled, chunked_logits, head_logits, hf_model, hidden_states_as_logits
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.profiling import timed


@dataclass
class TokenScores:
    """Log-probabilities of target tokens, without and with steering (and at each of G candidates:
    ``grid`` is (G, N))."""

    plain: torch.Tensor
    steered: torch.Tensor | None
    grid: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> TokenScores:
        """The scores at ``index`` (e.g. a shared target's score once for each continuation)."""
        return TokenScores(self.plain[index], None if self.steered is None else self.steered[index],
                           None if self.grid is None else self.grid[:, index])


def score_tokens(
    head: nn.Module,
    adapted_hidden: torch.Tensor,
    targets: torch.Tensor,
    steering: SteeringVector | None = None,
    base_hidden: torch.Tensor | None = None,
    chunk_tokens: int = 256,
    candidates: list[Candidate] | None = None,
) -> TokenScores:
    """log p(target) for each of N positions, plain and (if a vector is given) steered; with
    ``candidates``, also steered at each (mode, mu) from the same logits: each mode's direction at
    mu = 1 once per chunk (static: the vector; dynamic: from these adapted and base logits), then
    one log-softmax per candidate."""
    plain = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    steered = torch.empty_like(plain) if steering is not None else None
    grid = None
    if steering is not None and candidates:
        grid = torch.empty(len(candidates), targets.shape[0], dtype=torch.float32, device=targets.device)
    modes = {c.mode for c in candidates or []}
    for rows, logits in chunked_logits(head, adapted_hidden, chunk_tokens):
        base = head_logits(head, base_hidden[rows]) if needs_base_logits(steering, candidates) else None
        with timed("log-softmax"):
            y = targets[rows].unsqueeze(-1)
            plain[rows] = torch.log_softmax(logits, -1).gather(-1, y).squeeze(-1)
            if steering is not None:
                steered[rows] = torch.log_softmax(steering.steer(logits, base), -1).gather(-1, y).squeeze(-1)
            if grid is not None:
                directions = {mode: steering.at(Candidate(mode, 1.0)).shift(logits, base) for mode in modes}
                for g, candidate in enumerate(candidates):
                    shifted = logits + candidate.mu * directions[candidate.mode]
                    grid[g, rows] = torch.log_softmax(shifted, -1).gather(-1, y).squeeze(-1)
    return TokenScores(plain, steered, grid)


def needs_base_logits(steering: SteeringVector | None, candidates: list[Candidate] | None) -> bool:
    """Whether the steered scores need the base model's logits (dynamic steering, or a dynamic
    candidate: one forward with the adapter off serves every strength)."""
    if steering is None:
        return False
    return steering.needs_base_logits or any(c.mode == "dynamic" for c in candidates or [])


class PairSums:
    """Token scores added up per (context, continuation) pair, in float64, for every context."""

    def __init__(self, continuations: list[list[list[int]]], steering: SteeringVector | None,
                 candidates: list[Candidate] | None = None) -> None:
        zeros = lambda *shape: [torch.zeros(*shape, len(c), dtype=torch.float64) for c in continuations]  # noqa: E731
        self.plain = zeros()
        self.steered = zeros() if steering is not None else None
        self.grid = zeros(len(candidates)) if steering is not None and candidates else None

    def add(self, scores: TokenScores, owner: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """``owner`` gives each token's index into ``pairs``."""
        def sums(values: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(*values.shape[:-1], len(pairs), dtype=torch.float64, device=values.device)
            return out.index_add_(-1, owner, values.double()).cpu()

        for values, out in ((scores.plain, self.plain), (scores.steered, self.steered)):
            if values is not None and out is not None:
                for (q, a), value in zip(pairs, sums(values).tolist()):
                    out[q][a] = value
        if scores.grid is not None and self.grid is not None:
            totals = sums(scores.grid)
            for index, (q, a) in enumerate(pairs):
                self.grid[q][:, a] = totals[:, index]

    def results(self) -> list[TokenScores]:
        return [TokenScores(self.plain[q], None if self.steered is None else self.steered[q],
                            None if self.grid is None else self.grid[q]) for q in range(len(self.plain))]


@dataclass
class ScoringJob:
    """What every packing of :func:`score_many` shares: the model, the contexts with their
    continuations, the steering and the head's chunking, and the primer cache (its first
    ``prefix_len`` tokens, shared by all contexts, encoded once per model state)."""

    model: nn.Module
    contexts: list[list[int]]
    continuations: list[list[list[int]]]
    steering: SteeringVector | None
    chunk_tokens: int
    pad_id: int
    prefix: PrefixCache | None
    prefix_len: int
    candidates: list[Candidate] | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def primer_key_values(self, state: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The cached primer's (keys, values) per layer, read in place; None without a primer."""
        if self.prefix is None:
            return None
        return self.prefix.key_values(self.model, self.contexts[0][: self.prefix_len], state, self.device)

    def primer_cache(self, state: str, rows: int) -> Any:
        """A copy of the cached primer for a pass of ``rows`` rows that appends to it; None without."""
        if self.prefix is None:
            return None
        cache = self.prefix.get(self.model, self.contexts[0][: self.prefix_len], state, self.device)
        cache.batch_repeat_interleave(rows)
        return cache

    def pairs(self, group: list[int]) -> list[tuple[int, int]]:
        """The (context, continuation) pairs of the contexts in ``group``."""
        return [(q, a) for q in group for a in range(len(self.continuations[q]))]

    def pair_sums(self) -> PairSums:
        return PairSums(self.continuations, self.steering, self.candidates)

    def score(self, hidden_of, targets: torch.Tensor) -> TokenScores:
        """Token scores of one forward pass: ``hidden_of(state)`` gives the final hidden states that
        predict ``targets``, adapted, and with the adapter off when the steering needs base logits."""
        adapted = hidden_of("adapted")
        base = None
        if needs_base_logits(self.steering, self.candidates):
            with adapter_disabled(self.model):
                base = hidden_of("base")
        head = hf_model(self.model).get_output_embeddings()
        return score_tokens(head, adapted, targets, self.steering, base, self.chunk_tokens, self.candidates)


class PrefixCache:
    """Keys and values of a token prefix shared by many contexts (the QA primer), computed once
    per model state ("adapted" / "base") and copied for each context that starts with it."""

    def __init__(self) -> None:
        self._ids: tuple[int, ...] | None = None
        self._caches: dict[str, Any] = {}

    def cache(self, model: nn.Module, prefix_ids: list[int], state: str, device: torch.device) -> Any:
        """The cached prefix itself (not to be extended: see :meth:`get`)."""
        if tuple(prefix_ids) != self._ids:
            self._ids, self._caches = tuple(prefix_ids), {}
        if state not in self._caches:
            with timed("primer cache", len(prefix_ids)), hidden_states_as_logits(model):
                out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
            self._caches[state] = out.past_key_values
        return self._caches[state]

    def get(self, model: nn.Module, prefix_ids: list[int], state: str, device: torch.device) -> Any:
        """A copy of the cached prefix, for a forward pass that appends to it."""
        return copy.deepcopy(self.cache(model, prefix_ids, state, device))

    def key_values(
        self, model: nn.Module, prefix_ids: list[int], state: str, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) of each layer, (1, kv heads, prefix length, head dim), without a copy."""
        return [(layer.keys, layer.values) for layer in self.cache(model, prefix_ids, state, device).layers]
