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
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

SteeringMode = Literal["static", "dynamic"]

_TENSORS_FILE = "steering_vector.safetensors"
_META_FILE = "steering_vector.json"


def _check_finite(logits: torch.Tensor, name: str) -> None:
    if not torch.isfinite(logits).all():
        raise ValueError(f"{name} contain non-finite values (NaN or inf)")


def softmax_jvp(probs: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(diag(p) - p p^T) v computed as p*v - p*(p.v): O(V) memory instead of O(V^2)."""
    return probs * vector - probs * (probs * vector).sum(-1, keepdim=True)


def steering_direction(
    adapted_logits: torch.Tensor,
    base_logits: torch.Tensor,
    confidence_threshold: float = 0.0,
) -> torch.Tensor:
    """Per-position steering direction delta_z = (diag(p) - p p^T)(-log(p_phi / p_theta) - 1).

    This is minus the gradient of KL(softmax(z_phi) || p_theta) with respect to z_phi. The log
    ratio uses log_softmax of both logits, so a probability that underflows never meets a log.
    The "-1" of the formula lies in the null space of the softmax Jacobian (its rows sum to
    zero), so it is dropped: same value, one rounding error less.

    Confidence-aware constraint: vocabulary entries whose warm-started probability p_phi is
    below ``confidence_threshold`` are zeroed in the direction (0.0 filters nothing).

    Returns a float32 tensor of the same shape as the logits.
    """
    if adapted_logits.shape != base_logits.shape:
        raise ValueError(
            f"adapted logits {tuple(adapted_logits.shape)} and base logits "
            f"{tuple(base_logits.shape)} differ in shape"
        )
    log_p = torch.log_softmax(adapted_logits.float(), dim=-1)
    log_q = torch.log_softmax(base_logits.float(), dim=-1)
    probs = log_p.exp()
    direction = softmax_jvp(probs, log_q - log_p)
    if confidence_threshold > 0.0:
        direction = direction.masked_fill(probs < confidence_threshold, 0.0)
    return direction


def fine_tuning_gradient(adapted_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """e_y - p_phi: minus the gradient of the cross-entropy of the targets w.r.t. the logits."""
    grad = -torch.softmax(adapted_logits.float(), dim=-1)
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(grad[..., :1]))
    return grad


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
    confidence_threshold: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The per-chunk sums behind mu* (and the static direction) for (N, V) logits."""
    _check_finite(adapted_logits, "adapted logits")
    _check_finite(base_logits, "base logits")
    direction = steering_direction(adapted_logits, base_logits, confidence_threshold)
    grad = fine_tuning_gradient(adapted_logits, targets)
    sums = {"count": torch.tensor(float(targets.numel()), dtype=torch.float64)}
    if mode == "static":
        sums["direction_sum"] = direction.sum(0, dtype=torch.float64)
        sums["gradient_sum"] = grad.sum(0, dtype=torch.float64)
    else:
        sums["numerator"] = (grad * direction).sum(dtype=torch.float64)
        sums["denominator"] = (direction * direction).sum(dtype=torch.float64)
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
    mu: float | None = None,
    mu_scale: float = 1.0,
    metadata: dict | None = None,
) -> SteeringVector:
    """Turn the (already reduced) sums into a SteeringVector with its fitted mu*."""
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
    meta.update(token_count=int(n), mu_star=mu_star, eps=eps, mu_scale=mu_scale, mu_override=mu)
    strength = (mu_star if mu is None else mu) * mu_scale
    return SteeringVector(direction, strength, mode=mode, confidence_threshold=confidence_threshold, metadata=meta)


class SteeringVector:
    """A fitted steering vector: a (V,) task direction in static mode (or none in dynamic mode,
    where the direction is recomputed from each step's logits) and its strength mu."""

    def __init__(
        self,
        direction: torch.Tensor | None,
        mu: float,
        mode: SteeringMode = "static",
        confidence_threshold: float = 0.0,
        metadata: dict | None = None,
    ) -> None:
        if mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        if mode == "static":
            if direction is None or direction.dim() != 1:
                raise ValueError("a static steering vector needs a (V,) direction tensor")
            direction = direction.detach().float()
        self.direction = direction
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

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mu": self.mu, "confidence_threshold": self.confidence_threshold,
                "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        """Write ``steering_vector.safetensors`` + ``steering_vector.json`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {} if self.direction is None else {"direction": self.direction.contiguous().cpu()}
        save_file(tensors, str(path / _TENSORS_FILE))
        (path / _META_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Load what :meth:`save` wrote; errors name the file and the field that is wrong."""
        path = Path(path)
        meta_file, tensor_file = path / _META_FILE, path / _TENSORS_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: steering vector metadata not found")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
        for key in ("mode", "mu", "confidence_threshold", "metadata"):
            if key not in meta:
                raise ValueError(f"{meta_file}: missing field {key!r}")
        direction = None
        if meta["mode"] == "static":
            if not tensor_file.is_file():
                raise FileNotFoundError(f"{tensor_file}: steering direction not found")
            tensors = load_file(str(tensor_file))
            if "direction" not in tensors:
                raise ValueError(f"{tensor_file}: missing tensor 'direction'")
            direction = tensors["direction"]
        return cls(direction, meta["mu"], meta["mode"], meta["confidence_threshold"], meta["metadata"])

    def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str | None, source: str = "steering vector"
    ) -> None:
        """Refuse a vector extracted for another vocabulary or tokenizer."""
        mine = self.metadata.get("vocab_size")
        if mine is not None and mine != vocab_size:
            raise ValueError(f"{source}: field 'vocab_size' is {mine} but the model has {vocab_size} logits")
        fp = self.metadata.get("tokenizer_fingerprint")
        if fp is not None and tokenizer_fingerprint is not None and fp != tokenizer_fingerprint:
            raise ValueError(
                f"{source}: field 'tokenizer_fingerprint' is {fp} but the model's tokenizer is {tokenizer_fingerprint}"
            )

    def __repr__(self) -> str:
        return (f"SteeringVector(mode={self.mode!r}, mu={self.mu:.6g}, "
                f"confidence_threshold={self.confidence_threshold}, vocab_size={self.vocab_size})")
