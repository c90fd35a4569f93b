"""Where evaluation time goes: an opt-in profile that benchmarks read; off, it costs nothing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


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
