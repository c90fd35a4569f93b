"""Log-likelihood scoring of continuations, plain and steered, in bounded memory.

Plain torch + transformers: no Lightning. The model's head is applied only at the positions
that predict target tokens, ``chunk_tokens`` positions at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from svdecode_pl.modeling import adapter_disabled, hf_model, hidden_states_as_logits
from svdecode_pl.steering import SteeringVector


@dataclass
class ScoringProfile:
    """Where scoring time goes: seconds per part, and the tokens fed to the model (padding
    included), filled while :func:`profiling` is active. Benchmarks read it; off, it costs nothing."""

    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    forward_passes: int = 0


_PROFILE: ScoringProfile | None = None


@contextlib.contextmanager
def profiling() -> Iterator[ScoringProfile]:
    """Collect a :class:`ScoringProfile` of the scoring calls made inside the block."""
    global _PROFILE
    previous, _PROFILE = _PROFILE, ScoringProfile()
    try:
        yield _PROFILE
    finally:
        _PROFILE = previous


@contextlib.contextmanager
def timed(part: str, tokens: int = 0) -> Iterator[None]:
    """Add the block's wall time (device work included) to ``part`` of the active profile."""
    if _PROFILE is None:
        yield
        return
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    _PROFILE.seconds[part] = _PROFILE.seconds.get(part, 0.0) + time.perf_counter() - start
    if tokens:
        _PROFILE.tokens += tokens
        _PROFILE.forward_passes += 1


#: Fewest rows a matrix product gets here. BLAS takes another code path (another summation
#: order) for a few rows (up to 11 with MKL on this machine), so a row's result would depend on
#: how many rows share its product; from this size on it does not (``tests/test_scoring.py``).
MIN_GEMM_ROWS = 64


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of (N, H) hidden states; a product of fewer than :data:`MIN_GEMM_ROWS`
    rows gets zero rows added, so a row's logits do not depend on which rows share the call."""
    with timed("output head"):
        if hidden.shape[0] >= MIN_GEMM_ROWS:
            return head(hidden).float()
        padded = torch.cat([hidden, hidden.new_zeros(MIN_GEMM_ROWS - hidden.shape[0], hidden.shape[1])])
        return head(padded)[: hidden.shape[0]].float()


def chunked_logits(head: nn.Module, hidden: torch.Tensor, chunk_tokens: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 logits of (N, H) hidden states, ``chunk_tokens`` rows at a time (:func:`head_logits`)."""
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
        yield rows, head_logits(head, hidden[rows])


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
    """Log-probabilities of target tokens, without and with steering (and at each strength of a
    mu grid: ``grid`` is (G, N))."""

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
    mu_grid: list[float] | None = None,
) -> TokenScores:
    """log p(target) for each of N positions, plain and (if a vector is given) steered; with a
    ``mu_grid``, also steered at each of its strengths from the same logits (static: one more
    vector per strength; dynamic: the direction computed once per chunk)."""
    plain = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    steered = torch.empty_like(plain) if steering is not None else None
    grid = None
    if steering is not None and mu_grid:
        grid = torch.empty(len(mu_grid), targets.shape[0], dtype=torch.float32, device=targets.device)
    for rows, logits in chunked_logits(head, adapted_hidden, chunk_tokens):
        base = head_logits(head, base_hidden[rows]) if steering is not None and steering.needs_base_logits else None
        with timed("log-softmax"):
            y = targets[rows].unsqueeze(-1)
            plain[rows] = torch.log_softmax(logits, -1).gather(-1, y).squeeze(-1)
            if steering is not None:
                steered[rows] = torch.log_softmax(steering.steer(logits, base), -1).gather(-1, y).squeeze(-1)
            if grid is not None:
                direction = steering.with_mu(1.0).shift(logits, base)  # delta_z at mu = 1
                for g, mu in enumerate(mu_grid):
                    grid[g, rows] = torch.log_softmax(logits + mu * direction, -1).gather(-1, y).squeeze(-1)
    return TokenScores(plain, steered, grid)


class PairSums:
    """Token scores added up per (context, continuation) pair, in float64, for every context."""

    def __init__(self, continuations: list[list[list[int]]], steering: SteeringVector | None,
                 mu_grid: list[float] | None = None) -> None:
        zeros = lambda *shape: [torch.zeros(*shape, len(c), dtype=torch.float64) for c in continuations]  # noqa: E731
        self.plain = zeros()
        self.steered = zeros() if steering is not None else None
        self.grid = zeros(len(mu_grid)) if steering is not None and mu_grid else None

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
    mu_grid: list[float] | None

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
        return PairSums(self.continuations, self.steering, self.mu_grid)

    def score(self, hidden_of, targets: torch.Tensor) -> TokenScores:
        """Token scores of one forward pass: ``hidden_of(state)`` gives the final hidden states that
        predict ``targets``, adapted, and with the adapter off when the steering needs base logits."""
        adapted = hidden_of("adapted")
        base = None
        if self.steering is not None and self.steering.needs_base_logits:
            with adapter_disabled(self.model):
                base = hidden_of("base")
        head = hf_model(self.model).get_output_embeddings()
        return score_tokens(head, adapted, targets, self.steering, base, self.chunk_tokens, self.mu_grid)


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


#: Tokens per forward pass of the default scoring (several questions packed in one row).
PACK_TOKENS = 2048

_SEGMENT_ATTENTION = "svdecode_segments"


@dataclass
class Segment:
    """One context with its continuations inside a packed row: tokens ``[start, stop)``, and the
    attention mask it would have in a forward pass of its own."""

    start: int
    stop: int
    mask: torch.Tensor  # (1, 1, stop - start, prefix + stop - start), bool (SDPA) or additive (eager)


@dataclass
class SegmentLayout:
    """What :func:`segment_attention` needs during one packed forward pass."""

    segments: list[Segment]
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # cached (keys, values) of each layer
    implementation: str  # the model's own attention ("sdpa" or "eager")


_LAYOUT: contextvars.ContextVar[SegmentLayout] = contextvars.ContextVar("svdecode_segment_layout")


def segment_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Attention of a row that packs several contexts: each segment attends, with the model's own
    attention function, to the cached prefix and to itself, with exactly the tensors (shapes,
    mask) of a forward pass of that segment alone. So its scores do not depend on which segments
    share the row (the linear layers compute each row of a matrix product alike whatever the
    other rows); padding after the last segment gets zeros."""
    layout = _LAYOUT.get()
    if layout.implementation != "sdpa":
        attend = sys.modules[type(module).__module__].eager_attention_forward
    elif kwargs.get("softcap") is None and kwargs.get("position_bias") is None:
        attend = grouped_sdpa
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as attend
    outputs = []
    for segment in layout.segments:
        span = slice(segment.start, segment.stop)
        keys, values = key[:, :, span], value[:, :, span]
        if layout.prefix is not None:
            cached_keys, cached_values = layout.prefix[module.layer_idx]
            keys, values = torch.cat([cached_keys, keys], dim=-2), torch.cat([cached_values, values], dim=-2)
        outputs.append(attend(module, query[:, :, span], keys, values, segment.mask, **kwargs)[0])
    padding = query.shape[2] - layout.segments[-1].stop
    if padding:
        outputs.append(outputs[-1].new_zeros(1, padding, *outputs[-1].shape[2:]))
    return torch.cat(outputs, dim=1), None


def grouped_sdpa(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for one segment, with its additive mask and the grouped key/value
    heads read in place (``enable_gqa``): transformers copies them once per query head group
    whenever there is a mask, which with the boolean-to-additive conversion doubled the time of
    attention on CPU."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def segment_attention_active(model: nn.Module, layout: SegmentLayout) -> Iterator[None]:
    """Run ``model``'s attention as :func:`segment_attention` over ``layout``."""
    from transformers import AttentionInterface

    if _SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SEGMENT_ATTENTION, segment_attention)
    config = hf_model(model).config
    token = _LAYOUT.set(layout)
    config._attn_implementation = _SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = layout.implementation
        _LAYOUT.reset(token)


def pack_groups(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Consecutive indices whose lengths add up to at most ``pack_tokens`` (a longer item alone)."""
    groups: list[list[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if not groups or total + length > pack_tokens:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += length
    return groups


def score_segments(job: ScoringJob, pack_tokens: int) -> list[TokenScores]:
    """:func:`score_many` with several contexts, each with the trie of its continuations, packed one after
    the other in one row of up to ``pack_tokens`` tokens, each segment attending to itself only
    (:func:`segment_attention`): few, large matrix products, no padding, and every score the same
    whatever the packing, so 1 and N processes agree bit for bit."""
    inner = hf_model(job.model)
    implementation = inner.config._attn_implementation
    mask_dtype = inner.dtype  # additive: SDPA turns a boolean mask into one on every call
    rows = [(context[job.prefix_len :], continuation_trie(conts))
            for context, conts in zip(job.contexts, job.continuations)]
    lengths = [len(context) + len(trie.tokens) for context, trie in rows]
    sums = job.pair_sums()

    def hidden_of(packed: PackedRows, bounds: list[tuple[int, int]], state: str) -> torch.Tensor:
        cached = job.primer_key_values(state)
        past = 0 if cached is None else cached[0][0].shape[-2]
        segments = [Segment(start, stop, packed_attention_mask(packed.ends[:, start:stop] - start, past, mask_dtype))
                    for start, stop in bounds]
        layout = SegmentLayout(segments, cached, implementation)
        with timed("forward passes", packed.ids.numel()), segment_attention_active(job.model, layout):
            with hidden_states_as_logits(job.model):
                out = inner(
                    input_ids=packed.ids, attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=job.device),
                    position_ids=packed.positions + past, use_cache=False,
                ).logits
        return out[packed.source]

    for group in pack_groups(lengths, pack_tokens):
        with timed("packing"):
            packed = pack_rows([rows[q][0] for q in group], [rows[q][1] for q in group], job.pad_id, job.device,
                               concatenate=True, min_length=MIN_GEMM_ROWS)
            stops = torch.tensor([lengths[q] for q in group]).cumsum(0).tolist()
            bounds = list(zip([0, *stops[:-1]], stops))
        scores = job.score(functools.partial(hidden_of, packed, bounds), packed.targets)
        sums.add(scores.select(packed.expand), packed.owner, job.pairs(group))
    return sums.results()


@dataclass
class ContinuationTrie:
    """The distinct prefixes of a context's continuations: continuations that start alike share
    their leading tokens. Nodes that have children are fed to the model, in depth-first order
    (a node's descendants follow it, up to ``ends``); every node is a target, predicted by its
    parent (the context's last token for a first token)."""

    tokens: list[int]  # fed nodes: token
    depths: list[int]  # fed nodes: 1 for a first continuation token
    ends: list[int]  # fed nodes: the fed index after its descendants
    sources: list[int]  # targets: the fed index of the node predicting it, -1 for the context's last token
    targets: list[int]  # targets: token
    paths: list[list[int]]  # per continuation, the target index of each of its tokens


def continuation_trie(continuations: list[list[int]]) -> ContinuationTrie:
    """Build the :class:`ContinuationTrie` of one context's continuations.

    >>> trie = continuation_trie([[5, 6, 7], [5, 6, 8], [9]])
    >>> trie.tokens, trie.depths, trie.ends  # 5 and 6 are fed once, the leaves 7, 8, 9 not at all
    ([5, 6], [1, 2], [2, 2])
    >>> trie.sources, trie.targets, trie.paths
    ([-1, 0, 1, 1, -1], [5, 6, 7, 8, 9], [[0, 1, 2], [0, 1, 3], [4]])
    """
    children: list[dict[int, int]] = [{}]  # node 0: the context's last token
    parents, tokens, paths = [-1], [-1], []
    for continuation in continuations:
        node, path = 0, []
        for token in continuation:
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                children[node][token] = child
                children.append({})
                parents.append(node)
                tokens.append(token)
            path.append(child - 1)
            node = child
        paths.append(path)
    trie = ContinuationTrie([], [], [], [], tokens[1:], paths)
    fed = {0: -1}
    stack = [(child, 1, False) for child in reversed(children[0].values())]
    while stack:
        node, depth, done = stack.pop()
        if done:
            trie.ends[fed[node]] = len(trie.tokens)
        elif children[node]:
            fed[node] = len(trie.tokens)
            trie.tokens.append(tokens[node])
            trie.depths.append(depth)
            trie.ends.append(-1)
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in reversed(children[node].values()))
    trie.sources = [fed[parents[node]] for node in range(1, len(tokens))]
    return trie


@dataclass
class PackedRows:
    """One row per context: the context's tokens, then the :class:`ContinuationTrie` of its
    continuations, all in one sequence.

    A custom attention mask lets a trie token see the context and its own ancestors only, and
    positions continue from the context along each path, so the row computes exactly what
    separate (context + continuation) sequences would, with the context and each distinct
    continuation prefix encoded once, no padding between continuations, and the output head and
    log-softmax applied once per distinct (prefix, next token).
    """

    ids: torch.Tensor  # (B, L) token ids, right-padded
    positions: torch.Tensor  # (B, L) position of each token after the context start
    ends: torch.Tensor  # (B, L) the column after each token's descendants: [j, ends[j]) attend to j
    source: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the state predicting each distinct target
    targets: torch.Tensor  # (N,) the distinct targets' tokens
    expand: torch.Tensor  # (T,) the distinct target of each continuation token, continuation after continuation
    owner: torch.Tensor  # (T,) index of the (context, continuation) pair each continuation token belongs to


def pack_rows(
    contexts: list[list[int]], tries: list[ContinuationTrie], pad_id: int, device, concatenate: bool = False,
    min_length: int = 0,
) -> PackedRows:
    """Pack each context with the trie of its continuations into one row (see :class:`PackedRows`),
    or, with ``concatenate``, all of them one after the other into a single row; rows are
    right-padded to the longest, and to at least ``min_length`` tokens."""
    rows: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, ends) of each row
    source_rows, source_columns, targets, expand, owner = [], [], [], [], []
    pair = 0
    for context, trie in zip(contexts, tries):
        if not concatenate or not rows:
            rows.append(([], [], []))
        ids, positions, ends = rows[-1]
        row = len(rows) - 1
        first = len(ids) + len(context)  # the column of the first trie token
        ids += context + trie.tokens
        positions += [*range(len(context)), *(len(context) + depth - 1 for depth in trie.depths)]
        ends += [first + len(trie.tokens)] * len(context) + [first + end for end in trie.ends]
        source_columns += [first - 1 if source < 0 else first + source for source in trie.sources]
        source_rows += [row] * len(trie.targets)
        for path in trie.paths:
            expand += [len(targets) + target for target in path]
            owner += [pair] * len(path)
            pair += 1
        targets += trie.targets
    length = max(min_length, *(len(ids) for ids, _, _ in rows))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long).to(device)  # noqa: E731
    return PackedRows(
        as_tensor([ids + [pad_id] * (length - len(ids)) for ids, _, _ in rows]),
        as_tensor([positions + [0] * (length - len(positions)) for _, positions, _ in rows]),
        as_tensor([ends + list(range(len(ends) + 1, length + 1)) for _, _, ends in rows]),
        (as_tensor(source_rows), as_tensor(source_columns)), as_tensor(targets), as_tensor(expand), as_tensor(owner),
    )


def packed_attention_mask(ends: torch.Tensor, past_length: int, dtype: torch.dtype | None) -> torch.Tensor:
    """(B, 1, L, past + L) mask from the ``ends`` of :class:`PackedRows`: every token sees the
    cached prefix; token i sees token j if j <= i < ends[j] (the context, its own ancestors, itself).
    ``dtype=None`` gives a boolean mask (SDPA), a float dtype an additive one (eager attention)."""
    index = torch.arange(ends.shape[1], device=ends.device)
    allowed = (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] < ends[:, None, :])
    past = torch.ones(*allowed.shape[:2], past_length, dtype=torch.bool, device=ends.device)
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
    pack_tokens: int = PACK_TOKENS,
    mu_grid: list[float] | None = None,
) -> list[TokenScores]:
    """Sum of token log-probabilities of every continuation of every context.

    With a ``prefix`` cache, the first ``prefix_len`` tokens, which all contexts share (the QA
    primer), are encoded once per model state and every context attends to their cached keys
    and values. Each context is encoded once, followed by its continuations as a trie (shared
    leading tokens once; see :class:`PackedRows`). By default (``max_batch_tokens`` 0) contexts are packed one after the
    other into rows of up to ``pack_tokens`` tokens, each attending to itself only
    (:func:`score_segments`), so a score does not depend on which contexts share a pass;
    ``max_batch_tokens`` > 0 batches length-sorted rows up to that many padded tokens instead
    (float32 rounding then varies with the batch). Attention implementations that take no custom
    mask (e.g. flash attention) run one right-padded row per (context, continuation) pair.
    """
    if any(len(c) == 0 for conts in continuations for c in conts):
        raise ValueError("a continuation has no tokens")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("a context has no tokens (the first continuation token needs one to predict it)")
    use_prefix = prefix is not None and prefix_len > 0 and all(len(c) > prefix_len for c in contexts)
    prefix, prefix_len = (prefix, prefix_len) if use_prefix else (None, 0)
    job = ScoringJob(model, contexts, continuations, steering, chunk_tokens, pad_id, prefix, prefix_len, mu_grid)
    if packs_rows(model) and (use_prefix or not is_prompt_learning(model)):
        return score_segments(job, pack_tokens) if max_batch_tokens <= 0 else score_packed(job, max_batch_tokens)
    return score_padded(job, max_batch_tokens)


def score_packed(job: ScoringJob, max_batch_tokens: int) -> list[TokenScores]:
    """:func:`score_many` with one packed row per context."""
    inner = hf_model(job.model)
    mask_dtype = inner.dtype  # additive, as in score_segments
    tries = [continuation_trie(conts) for conts in job.continuations]
    length = lambda q: len(job.contexts[q]) + len(tries[q].tokens)  # noqa: E731
    order = sorted(range(len(job.contexts)), key=length)
    sums = job.pair_sums()

    def hidden_of(rows: PackedRows, state: str) -> torch.Tensor:
        cache = job.primer_cache(state, rows.ids.shape[0])
        past = 0 if cache is None else cache.get_seq_length()
        with timed("forward passes", rows.ids.numel()), hidden_states_as_logits(job.model):
            out = inner(
                input_ids=rows.ids, attention_mask=packed_attention_mask(rows.ends, past, mask_dtype),
                position_ids=rows.positions + past, past_key_values=cache, use_cache=cache is not None,
            ).logits
        return out[rows.source]

    for group in length_batches(order, length, max_batch_tokens):
        with timed("packing"):
            rows = pack_rows([job.contexts[q][job.prefix_len :] for q in group], [tries[q] for q in group],
                             job.pad_id, job.device)
        scores = job.score(functools.partial(hidden_of, rows), rows.targets)
        sums.add(scores.select(rows.expand), rows.owner, job.pairs(group))
    return sums.results()


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


def score_padded(job: ScoringJob, max_batch_tokens: int) -> list[TokenScores]:
    """:func:`score_many` with one right-padded row per (context, continuation) pair: a causal
    model's real tokens never attend to later pads, so no mask is needed."""
    contexts, continuations, prefix_len, device = job.contexts, job.continuations, job.prefix_len, job.device
    pairs = job.pairs(list(range(len(contexts))))
    length = lambda qa: len(contexts[qa[0]]) - prefix_len + len(continuations[qa[0]][qa[1]])  # noqa: E731
    order = sorted(range(len(pairs)), key=lambda i: length(pairs[i]))
    sums = job.pair_sums()

    def hidden_of(ids: torch.Tensor, predict: torch.Tensor, state: str) -> torch.Tensor:
        with timed("forward passes", ids.numel()), hidden_states_as_logits(job.model):
            cache = job.primer_cache(state, ids.shape[0])
            if cache is not None:
                return hf_model(job.model)(input_ids=ids, past_key_values=cache, use_cache=True).logits[predict]
            out = job.model(input_ids=ids, use_cache=False).logits
            return out[:, out.shape[1] - ids.shape[1] :][predict]  # drop prompt-tuning virtual tokens

    for batch in length_batches(order, lambda i: length(pairs[i]), max_batch_tokens):
        group = [pairs[i] for i in batch]
        seqs = [contexts[q][prefix_len:] + continuations[q][a] for q, a in group]
        ids = torch.full((len(group), max(map(len, seqs))), job.pad_id, device=device)
        predict = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for row, ((q, _), seq) in enumerate(zip(group, seqs)):
            ids[row, : len(seq)] = torch.tensor(seq, device=device)
            first = len(contexts[q]) - prefix_len - 1  # the position predicting the first continuation token
            predict[row, first : len(seq) - 1] = True
        targets = ids[:, 1:][predict[:, :-1]]
        scores = job.score(functools.partial(hidden_of, ids, predict), targets)
        owner = torch.arange(len(group), device=device)[:, None].expand_as(predict)[predict]
        sums.add(scores, owner, group)
    return sums.results()


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
