"""Static steering for inference servers: mu * d as a sparse OpenAI-style ``logit_bias``.

A server adds ``logit_bias[token]`` to that token's logit before sampling, which is static
steering restricted to a few entries. Softmax ignores a constant added to every logit, so we
export ``mu * d - c`` and choose the constant c and the kept entries together: the dropped
entries are the ``V - K`` values of ``mu * d`` lying in the narrowest window, c its midpoint.
Then the served logits equal the fully steered ones up to the constant c and an error e with
``max |e| <= max_dropped`` (half the window, or a clamped entry's excess over the limit): greedy
decoding agrees wherever the steered top-two margin exceeds ``2 * max_dropped``, and each
probability is within a factor ``exp(2 * max_dropped)``. Dynamic steering depends on each step's
base logits and cannot be served this way (a server sees one model's logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdecode_pl.steering.values import check_steering_values
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import OptionError

#: the most entries current vLLM accepts in one request's logit_bias
MAX_ENTRIES = 1024
#: OpenAI-compatible servers clamp (or refuse) biases outside [-100, 100]
CLAMP = 100.0


@dataclass
class LogitBias:
    """The exported bias and what the truncation keeps."""

    bias: dict[int, float]
    offset: float  # the constant c subtracted from mu * d
    kept_share: float  # share of ||mu*d - c||^2 on the kept entries
    max_dropped: float  # largest |logit change| the export drops (window half-width or clamp excess)

    def summary(self) -> str:
        return (f"logit_bias: {len(self.bias)} entries keep {self.kept_share:.2%} of the squared norm of "
                f"mu*d - c (c = {self.offset:.4g}); largest logit change dropped: {self.max_dropped:.4g}")


def export_logit_bias(vector: SteeringVector, max_entries: int | None = None, clamp: float = CLAMP) -> LogitBias:
    """The sparse bias of at most ``max_entries`` entries (default: :data:`MAX_ENTRIES`, or the whole
    vocabulary when it is smaller), each within ``[-clamp, clamp]``."""
    if vector.mode != "static" or vector.direction is None:
        raise OptionError("logit-bias: a dynamic steering vector cannot be exported (its shift depends on each "
                          "step's base logits, which a server does not compute); use a static vector")
    shift = (vector.mu * vector.direction).double()
    vocab = shift.numel()
    check_steering_values("logit_bias: ", clamp=clamp, max_entries=max_entries)
    if max_entries is None:
        max_entries = min(MAX_ENTRIES, vocab)
    if not 0 < max_entries <= vocab:
        raise OptionError(f"--max-entries: {max_entries} entries requested, but the vocabulary has {vocab} "
                          f"(expected 1..{vocab})")
    values, order = torch.sort(shift)
    dropped = vocab - max_entries
    if dropped > 0:  # the narrowest window of `dropped` consecutive sorted values
        widths = values[dropped - 1:] - values[: vocab - dropped + 1]
        start = int(torch.argmin(widths))
        offset = float(values[start] + values[start + dropped - 1]) / 2
        keep = torch.cat([order[:start], order[start + dropped:]])
        half_width = float(widths[start]) / 2
    else:
        offset, keep, half_width = float(shift.mean()), order, 0.0
    centred = shift - offset
    kept = centred[keep]
    clamped = kept.clamp(-clamp, clamp)
    excess = float((kept - clamped).abs().max()) if keep.numel() else 0.0
    total = float(centred.square().sum())
    share = float(clamped.square().sum()) / total if total > 0 else 1.0
    bias = {int(t): float(b) for t, b in zip(keep.tolist(), clamped.tolist())}
    return LogitBias(bias, offset, share, max(half_width, excess))


def apply_logit_bias(scores: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """What a server does with ``logit_bias``: add each entry to its token's logit."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=scores.device)
    values = torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)
    return scores.index_add(-1, ids, values.expand(*scores.shape[:-1], -1))


def as_steering_vector(vector: SteeringVector, exported: LogitBias) -> SteeringVector:
    """What a server applies, as a static steering vector that ``svdecode test`` scores: the
    direction is the sparse bias divided by mu (zero off the kept entries), mu unchanged, so
    ``mu * direction`` is the bias (up to float32 rounding). Scoring it next to the full vector
    measures what the truncation and clamp cost on a task."""
    mu = vector.mu if vector.mu != 0 else 1.0
    direction = torch.zeros(vector.direction.numel(), dtype=torch.float64)
    if exported.bias:
        direction[list(exported.bias)] = torch.tensor(list(exported.bias.values()), dtype=torch.float64) / mu
    metadata = dict(vector.metadata, logit_bias_entries=len(exported.bias), logit_bias_offset=exported.offset,
                    logit_bias_max_dropped=exported.max_dropped)
    return SteeringVector(direction.float(), mu, "static", vector.confidence_threshold, metadata)


def model_vocab_size(name_or_path: str) -> int:
    """The number of logits a model produces, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from svdecode_pl.models.loading import resolve_name_or_path
    from svdecode_pl.utils.errors import loading_model

    with loading_model(name_or_path):
        config = AutoConfig.from_pretrained(resolve_name_or_path(name_or_path))
    return int(config.get_text_config().vocab_size)
