"""How questions share forward passes: each question's answers as a trie, questions packed
into long rows (default), length-sorted padded batches, or one padded row per answer."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from svdecode_pl.models.device_defaults import PACKING_TOLERANCE  # noqa: F401 (documented here too)
from svdecode_pl.models.heads import MIN_GEMM_ROWS, hf_model, hidden_states_as_logits
from svdecode_pl.scoring.attention import Segment, SegmentLayout, segment_attention_active
from svdecode_pl.scoring.job import ScoringJob, TokenScores
from svdecode_pl.utils.profiling import timed

#: Tokens per forward pass of the default scoring (several questions packed in one row).
PACK_TOKENS = 2048


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
    whatever the packing, bit for bit at one thread, to :data:`PACKING_TOLERANCE` at more."""
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
