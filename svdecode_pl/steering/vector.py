"""Steering Vector Decoding math, in plain torch so it can be reused with any `generate` loop.

All functions take logits of shape (..., V) and work in float32 whatever the model dtype.
Nothing here builds a V x V tensor: the softmax Jacobian is only ever applied as a
Jacobian-vector product.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from svdecode_pl.steering.strength import Candidate, SteeringMode, StrengthChoice
from svdecode_pl.steering.values import check_steering_values
from svdecode_pl.steering.vector_files import (
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    has_direction,
    read_direction,
    read_metadata,
)
from svdecode_pl.utils.errors import SteeringArtifactError
from svdecode_pl.utils.files import atomic_directory


def fine_tuning_gradient(adapted_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """e_y - p_phi: minus the gradient of the cross-entropy of the targets w.r.t. the logits.

    For reference and tests: the estimators below never build it, they use its sums."""
    grad = -torch.softmax(adapted_logits.float(), dim=-1)
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(grad[..., :1]))
    return grad


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a_i, b_i> for each row, as a (..., 1) tensor, without an (..., V) temporary."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def _scaled_direction(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    confidence_threshold: float,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e, d, s), float32, with p_phi = e / s and delta_z = d / s row by row.

    -log(p_phi / p_theta) - 1 = (z_theta - z_phi) + c with c constant per position, and the
    softmax Jacobian maps constants to zero (its rows sum to zero), so
    delta_z = p*w - p*<p, w> with w = z_theta - z_phi: no log of a probability that may have
    underflowed. The normaliser s is a separate (cascade) sum and is divided out only where
    needed: torch's fused softmax kernel sums 152k terms with an error up to ~1e-4.

    With a ``workspace`` (float32, the logits' shape) e is written into it and the float32
    ``base_logits`` buffer becomes d: nothing of size V is allocated.
    """
    if adapted_logits.shape != base_logits.shape:
        raise ValueError(
            f"adapted logits {tuple(adapted_logits.shape)} and base logits "
            f"{tuple(base_logits.shape)} differ in shape"
        )
    adapted = adapted_logits.float()
    shift = adapted.amax(-1, keepdim=True)
    if workspace is None:
        exp = (adapted - shift).exp_()
        scaled = base_logits.float() - adapted
    else:
        if base_logits.dtype != torch.float32 or workspace.shape != adapted.shape:
            raise ValueError("a workspace needs float32 base logits and a workspace of the logits' shape")
        exp = torch.sub(adapted, shift, out=workspace).exp_()
        scaled = base_logits.sub_(adapted)
    norm = exp.sum(-1, keepdim=True)
    scaled.mul_(exp)  # s * p * w
    centre = scaled.sum(-1, keepdim=True).div_(norm)  # <p, w>
    if not torch.isfinite(centre).all():  # a NaN or inf in either logits always reaches <p, w>
        raise ValueError("logits contain non-finite values (NaN or inf)")
    scaled.addcmul_(exp, centre, value=-1.0)  # s * (p*w - p*<p, w>)
    if confidence_threshold > 0.0:
        scaled.masked_fill_(exp < confidence_threshold * norm, 0.0)
    return exp, scaled, norm


def steering_direction(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    confidence_threshold: float = 0.0,
) -> torch.Tensor:
    """Per-position steering direction delta_z = (diag(p) - p p^T)(-log(p_phi / p_theta) - 1).

    This is minus the gradient of KL(softmax(z_phi) || p_theta) with respect to z_phi, computed
    as the Jacobian-vector product p*v - p*(p.v) (never a V x V matrix), in float32.

    Confidence-aware constraint: vocabulary entries whose warm-started probability p_phi is
    below ``confidence_threshold`` are zeroed in the direction (0.0 filters nothing).

    Returns a float32 tensor of the same shape as the logits.
    """
    _, scaled, norm = _scaled_direction(adapted_logits, base_logits, confidence_threshold)
    return scaled.div_(norm)


def optimal_strength(numerator: float, denominator: float, eps: float = 1e-8) -> float:
    """mu* = sum <e_y - p, delta> / (sum ||delta||^2 + eps), the least-squares fit of the
    fine-tuning step by the steering direction. A zero direction gives 0 with a warning."""
    if denominator <= 0.0:
        warnings.warn("steering direction is zero on every calibration token: mu* set to 0", stacklevel=2)
        return 0.0
    mu = numerator / (denominator + eps)
    if not math.isfinite(mu):
        raise ValueError(f"mu* is not finite (numerator={numerator}, denominator={denominator})")
    return mu


def steering_sums(
    mode: SteeringMode, adapted_logits: torch.Tensor, base_logits: torch.Tensor, targets: torch.Tensor,
    confidence_threshold: float = 0.0, workspace: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The sufficient statistics of N calibration tokens ((N, V) logits, (N,) targets), float64.

    static: sum_t delta_t and sum_t (e_y - p)_t, the latter as target counts minus summed
    probabilities (the (N, V) gradient is never built). dynamic: sum_t <e_y - p, delta>_t =
    sum_t (delta_t[y_t] - <p_t, delta_t>) and sum_t ||delta_t||^2. Column sums run in float32
    within the chunk and accumulate in float64 across chunks. ``workspace``: see
    :func:`_scaled_direction` (``base_logits`` is then overwritten).
    """
    exp, scaled, norm = _scaled_direction(adapted_logits, base_logits, confidence_threshold, workspace)
    inverse = norm.reciprocal()  # (N, 1): p = exp * inverse, delta = scaled * inverse
    sums = {"count": torch.tensor(float(targets.numel()), dtype=torch.float64, device=targets.device)}
    if confidence_threshold > 0.0:  # entries the confidence-aware constraint filtered out
        sums["filtered"] = (exp < confidence_threshold * norm).sum().double()
    if mode == "static":
        weights = inverse.T  # (1, N): the column sums below are matrix-vector products
        sums["direction_sum"] = (weights @ scaled)[0].double()
        gradient = -(weights @ exp)[0].double()
        sums["gradient_sum"] = gradient.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
    else:
        on_target = scaled.gather(-1, targets.unsqueeze(-1)) * inverse
        squared = inverse.square()
        sums["numerator"] = (on_target - _row_dot(exp, scaled) * squared).double().sum()
        sums["denominator"] = (_row_dot(scaled, scaled) * squared).double().sum()
    return sums


def steering_vector_from_sums(
    mode: SteeringMode,
    count: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    direction_sum: torch.Tensor | None,
    gradient_sum: torch.Tensor | None,
    confidence_threshold: float,
    eps: float = 1e-8,
    metadata: dict | None = None,
) -> SteeringVector:
    """Turn the (already reduced) sums into a SteeringVector at its fitted mu* (which strength a
    run steers at is :mod:`svdecode_pl.steering.strength`'s choice)."""
    n = float(count)
    if n == 0:
        raise ValueError("no calibration tokens: cannot fit a steering vector")
    direction = None
    if mode == "static":
        assert direction_sum is not None and gradient_sum is not None
        direction64 = direction_sum / n
        numerator = (gradient_sum * direction64).sum()
        denominator = n * (direction64 * direction64).sum()
        direction = direction64.float().cpu()
    mu_star = optimal_strength(float(numerator), float(denominator), eps)
    meta = dict(metadata or {})
    meta.update(token_count=int(n), mu_star=mu_star, eps=eps)
    return SteeringVector(direction, mu_star, mode=mode, confidence_threshold=confidence_threshold, metadata=meta)


class SteeringVector:
    """A fitted steering vector: a (V,) task direction (required in static mode; in dynamic mode,
    where the direction is recomputed from each step's logits, kept when known so the static mode can
    be scored beside it), its strength mu and the record of how that strength was chosen."""

    def __init__(
        self,
        direction: torch.Tensor | None,
        mu: float,
        mode: SteeringMode = "static",
        confidence_threshold: float = 0.0,
        metadata: dict | None = None,
        choice: StrengthChoice | None = None,
    ) -> None:
        if mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        # a vector that could not be loaded back (NaN strength) is never built
        check_steering_values("SteeringVector: ", mu=mu, confidence_threshold=confidence_threshold)
        if mode == "static" and direction is None:
            raise ValueError("a static steering vector needs a (V,) direction tensor")
        if direction is not None:
            if direction.dim() != 1:
                raise ValueError("a steering direction is a (V,) tensor")
            direction = direction.detach().float()
        self.direction = direction
        self.choice = choice
        self.mu = float(mu)
        self.mode: SteeringMode = mode
        self.confidence_threshold = float(confidence_threshold)
        self.metadata: dict = dict(metadata or {})
        if direction is not None:
            self.metadata.setdefault("vocab_size", direction.numel())

    @property
    def vocab_size(self) -> int | None:
        return self.metadata.get("vocab_size")

    @property
    def needs_base_logits(self) -> bool:
        """Dynamic steering needs the pre-trained model's logits of the same step."""
        return self.mode == "dynamic"

    def shift(self, adapted_logits: torch.Tensor, base_logits: torch.Tensor | None = None) -> torch.Tensor:
        """mu * delta_z for these logits (float32, same shape)."""
        if self.mode == "static":
            assert self.direction is not None
            direction = self.direction.to(adapted_logits.device)
            return (self.mu * direction).expand(adapted_logits.shape)
        if base_logits is None:
            raise ValueError("dynamic steering needs the base model's logits of the same positions")
        return self.mu * steering_direction(adapted_logits, base_logits, self.confidence_threshold)

    def steer(self, adapted_logits: torch.Tensor, base_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Steered logits z_phi + mu * delta_z, in float32."""
        if adapted_logits.shape[-1] != self.vocab_size and self.vocab_size is not None:
            raise ValueError(
                f"logits have {adapted_logits.shape[-1]} vocabulary entries, the steering vector {self.vocab_size}"
            )
        return adapted_logits.float() + self.shift(adapted_logits, base_logits)

    @property
    def modes(self) -> tuple[SteeringMode, ...]:
        """The modes this vector can steer in (static needs the direction)."""
        return ("static", "dynamic") if self.direction is not None else ("dynamic",)

    def with_mu(self, mu: float) -> SteeringVector:
        """The same direction at another strength (a new vector: this one is unchanged)."""
        return SteeringVector(self.direction, mu, self.mode, self.confidence_threshold, self.metadata, self.choice)

    def with_metadata(self, **entries: Any) -> SteeringVector:
        """The same vector recording ``entries`` besides its metadata (a new vector: this one is unchanged)."""
        return SteeringVector(self.direction, self.mu, self.mode, self.confidence_threshold,
                              {**self.metadata, **entries}, self.choice)

    def at(self, candidate: Candidate) -> SteeringVector:
        """The same vector in ``candidate``'s mode and at its strength."""
        return SteeringVector(self.direction, candidate.mu, candidate.mode, self.confidence_threshold, self.metadata,
                              self.choice)

    def chosen(self, choice: StrengthChoice) -> SteeringVector:
        """The vector steering at what ``choice`` says, carrying the record."""
        candidate = choice.candidate
        return SteeringVector(self.direction, candidate.mu, candidate.mode, self.confidence_threshold, self.metadata,
                              choice)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "mode": self.mode, "mu": self.mu,
                "confidence_threshold": self.confidence_threshold, "metadata": self.metadata,
                "strength_choice": None if self.choice is None else self.choice.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write ``steering_vector.safetensors`` + ``steering_vector.json`` into directory ``path``,
        atomically: a kill leaves the previous artifact or the new one, never a mix or a torn file."""
        path = Path(path)
        tensors = {} if self.direction is None else {"direction": self.direction.contiguous().cpu()}
        with atomic_directory(path) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE))
            (tmp / META_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Load what :meth:`save` wrote; every problem is a :class:`SteeringArtifactError` naming
        the file and the field."""
        path = Path(path)
        meta_file, tensor_file = path / META_FILE, path / TENSORS_FILE
        if not path.is_dir():
            raise SteeringArtifactError(f"{path}: steering artifact directory not found")
        if not meta_file.is_file():
            raise SteeringArtifactError(f"{meta_file}: not found (the steering artifact's metadata)")
        meta = read_metadata(meta_file)
        direction = None
        if meta["mode"] == "static" or (meta.get("format_version", 1) >= 2 and has_direction(tensor_file)):
            direction = read_direction(tensor_file, meta["metadata"].get("vocab_size"))
        try:
            choice = meta.get("strength_choice")
            if meta.get("format_version", 1) < 2:
                choice = StrengthChoice.legacy(meta["mode"], meta["mu"], meta["metadata"])
            elif choice is not None:
                choice = StrengthChoice.from_dict(choice)
        except (KeyError, TypeError, ValueError) as err:
            raise SteeringArtifactError(f"{meta_file}: field 'strength_choice': {err!r}") from None
        try:
            return cls(direction, meta["mu"], meta["mode"], meta["confidence_threshold"], meta["metadata"], choice)
        except ValueError as err:
            raise SteeringArtifactError(f"{meta_file}: {err}") from None

    def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str | None, source: str = "steering vector"
    ) -> None:
        """Refuse a vector extracted for another vocabulary or tokenizer."""
        mine = self.metadata.get("vocab_size")
        if mine is not None and mine != vocab_size:
            raise SteeringArtifactError(
                f"{source}: field 'vocab_size': {mine}, but the model has {vocab_size} logits "
                f"(extracted from another model: {self.metadata.get('model')!r})")
        fp = self.metadata.get("tokenizer_fingerprint")
        if fp is not None and tokenizer_fingerprint is not None and fp != tokenizer_fingerprint:
            raise SteeringArtifactError(
                f"{source}: field 'tokenizer_fingerprint': {fp}, but the model's tokenizer is "
                f"{tokenizer_fingerprint} (extracted with another tokenizer)")

    def __repr__(self) -> str:
        return (f"SteeringVector(mode={self.mode!r}, mu={self.mu:.6g}, "
                f"confidence_threshold={self.confidence_threshold}, vocab_size={self.vocab_size})")
