"""The evaluation settings: one typed object that the LightningModule owns and that the steering
callback and the :class:`~svdecode_pl.evaluation.evaluator.Evaluator` read.

- scoring (the module's ``chunk_tokens`` and ``score_batch_tokens``);
- decoding and judging (the task's: its data module's ``generation_settings()``/``judge_settings()``);
- steering (the vector, its strength curves and candidates: :meth:`EvaluationSettings.with_steering`).

Frozen values: a change is a new object (``dataclasses.replace``), so an evaluator keeps the settings it
was built with and no two owners write one object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.judges import JudgeSettings
from svdecode_pl.steering.strength import Candidate
from svdecode_pl.steering.vector import SteeringVector


@dataclass(frozen=True)
class ScoringSettings:
    """How log-likelihood scoring runs."""

    chunk_tokens: int = 256
    """Positions whose logits are materialised at once (bounds memory at large vocabularies)."""
    score_batch_tokens: int = 0
    """0: the questions of a batch packed into rows of ``PACK_TOKENS`` tokens, each attending to itself
    and the cached primer only, so scores do not depend on which questions share a pass; N > 0:
    length-sorted questions batched with padding up to N tokens (for GPUs)."""


@dataclass(frozen=True)
class SteeringSettings:
    """The steering an evaluation applies (none: plain only)."""

    vector: SteeringVector | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    """mode -> absolute strengths at which every item is also evaluated steered (the strength curves)."""
    extra: list[Candidate] = field(default_factory=list)
    """Further (mode, mu) candidates scored in the same pass (the strength estimates)."""

    @property
    def grid(self) -> list[Candidate] | None:
        """Every candidate scored besides plain and steered, each once: the curves, then the
        candidates not on them, in the modes the vector can steer in (static needs its direction).
        Each is a decoding of every item for generation tasks."""
        if self.vector is None:
            return None
        found = [Candidate(mode, mu) for mode, strengths in self.curves.items() for mu in strengths]
        found = [c for c in dict.fromkeys([*found, *self.extra]) if c.mode in self.vector.modes]
        return found or None

    def column(self, candidate: Candidate) -> int | None:
        """The candidate's index in :attr:`grid` (None: not scored)."""
        grid = self.grid or []
        return grid.index(candidate) if candidate in grid else None


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything an evaluation is configured by, in one place."""

    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    generation: GenerationSettings | None = None
    """How generation items decode (None: greedy, no stop string, the items' ``max_new_tokens``)."""
    judges: JudgeSettings | None = None
    """Judges that score generated answers (None: none)."""
    steering: SteeringSettings = field(default_factory=SteeringSettings)

    def with_steering(
        self, vector: SteeringVector | None, curves: dict[str, list[float]] | None = None,
        extra: list[Candidate] | None = None,
    ) -> EvaluationSettings:
        """These settings steering with ``vector`` (None: plain only), its strength curves (mode ->
        strengths) and further candidates to score beside it."""
        return replace(self, steering=SteeringSettings(vector, dict(curves or {}), list(extra or [])))
