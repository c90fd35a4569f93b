"""The evaluation settings: one typed object that the LightningModule owns and that the steering
callback and the :class:`~svdecode_pl.evaluation.evaluator.Evaluator` read.

- scoring (the module's ``chunk_tokens`` and ``score_batch_tokens``);
- decoding and judging (the task's: its data module's ``generation_settings()``/``judge_settings()``);
- steering (the vector and the mu grid, attached by the steering callback through
  :meth:`EvaluationSettings.use_steering`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from svdecode_pl.evaluation.generation_settings import GenerationSettings
from svdecode_pl.evaluation.judges import JudgeSettings
from svdecode_pl.steering.vector import SteeringVector


@dataclass
class ScoringSettings:
    """How log-likelihood scoring runs."""

    chunk_tokens: int = 256
    """Positions whose logits are materialised at once (bounds memory at large vocabularies)."""
    score_batch_tokens: int = 0
    """0: the questions of a batch packed into rows of ``PACK_TOKENS`` tokens, each attending to itself
    and the cached primer only, so scores do not depend on which questions share a pass; N > 0:
    length-sorted questions batched with padding up to N tokens (for GPUs)."""


@dataclass
class SteeringSettings:
    """The steering an evaluation applies (none: plain only)."""

    vector: SteeringVector | None = None
    mu_grid: list[float] | None = None
    """Absolute strengths at which every item is also evaluated steered (the strength curve)."""
    estimates: dict[str, float] = field(default_factory=dict)
    """Named strengths (see :mod:`svdecode_pl.steering.estimates`) scored in the same pass, after the grid."""

    @property
    def grid(self) -> list[float] | None:
        """Every strength scored besides plain and steered: the mu grid, then the estimates that are
        not on it (when there is a vector to scale). Each strength is scored once: a decoding of
        every item for generation tasks."""
        curve = list(self.mu_grid or [])
        strengths = curve + [mu for mu in dict.fromkeys(self.estimates.values()) if mu not in curve]
        return strengths if self.vector is not None and strengths else None

    def estimate_columns(self) -> dict[str, int]:
        """Each named strength's index in :attr:`grid` (the curve's own when its value is on the curve)."""
        grid = self.grid or []
        return {name: grid.index(mu) for name, mu in self.estimates.items()}

    @property
    def curve_size(self) -> int:
        """How many of :attr:`grid`'s strengths are the curve (the rest are the estimates)."""
        return len(self.mu_grid or [])


@dataclass
class EvaluationSettings:
    """Everything an evaluation is configured by, in one place."""

    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    generation: GenerationSettings | None = None
    """How generation items decode (None: greedy, no stop string, the items' ``max_new_tokens``)."""
    judges: JudgeSettings | None = None
    """Judges that score generated answers (None: none)."""
    steering: SteeringSettings = field(default_factory=SteeringSettings)

    def use_steering(
        self, vector: SteeringVector | None, mu_grid: list[float] | None = None,
        estimates: dict[str, float] | None = None,
    ) -> None:
        """Attach (or, with None, remove) the steering vector, its strength curve and the named
        strengths to score beside it."""
        self.steering = SteeringSettings(vector, mu_grid, dict(estimates or {}))
