"""The passes behind a run's strength choice (the choice itself: :mod:`svdecode_pl.steering.strength`):
the calibration pass feeds both modes' fits and their confidence-filtered fits; the validation
split, when there is one, gets a calibration pass (held-out mu*) and one scoring pass at every
candidate (mode, mu): one forward with the adapter on and, for the dynamic candidates, one with it
off, whatever the number of strengths."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer

from svdecode_pl.evaluation.columns import Column, record_row, row_values
from svdecode_pl.evaluation.evaluator import Evaluator
from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.models.zero import full_output_head
from svdecode_pl.steering.calibration import SteeringStatistics, accumulate_calibration
from svdecode_pl.steering.strength import MODES, Candidate, ValidationScores
from svdecode_pl.steering.vector import SteeringVector


def has_split(trainer: Trainer, split: str) -> bool:
    """Whether the task has any example in ``split``."""
    return bool(trainer.datamodule.split(split))


@torch.no_grad()
def calibrate(
    trainer: Trainer, pl_module: LightningModule, split: str, stats: list[SteeringStatistics], batches=None,
) -> None:
    """One pass over the LM examples of ``split`` (sharded over processes) into every ``stats``."""
    loader = batches if batches is not None else trainer.datamodule.lm_dataloader(
        split, rank=trainer.global_rank, world_size=trainer.world_size)
    with full_output_head(pl_module.model, trainer) as head:
        try:
            accumulate_calibration(stats, pl_module.model, loader, head, pl_module.evaluation.scoring.chunk_tokens,
                                   pl_module.device)
        except ValueError as err:
            raise ValueError(f"{err} (split {split!r})") from None


def mode_statistics(pl_module: LightningModule, threshold: float) -> dict[str, SteeringStatistics]:
    """One statistics state per mode at ``threshold``, on the module's device."""
    return {mode: SteeringStatistics(mode, pl_module.vocab_size, threshold).to(pl_module.device) for mode in MODES}


def heldout_mu_stars(
    trainer: Trainer, pl_module: LightningModule, threshold: float, eps: float,
) -> dict[str, float] | None:
    """Each mode's mu* fitted on the validation split (None without one)."""
    if not has_split(trainer, "validation"):
        return None
    stats = mode_statistics(pl_module, threshold)
    calibrate(trainer, pl_module, "validation", list(stats.values()))
    return {mode: s.steering_vector(eps=eps).metadata["mu_star"] for mode, s in stats.items()}


@torch.no_grad()
def validation_scores(
    trainer: Trainer, pl_module: LightningModule, vector: SteeringVector, candidates: list[Candidate],
) -> ValidationScores | None:
    """Every validation question's metrics, plain and at each candidate, from one evaluation pass
    over the task's selection items (every process scores the whole split: the choice is the same
    everywhere). None without a validation split or a candidate."""
    if not candidates or not has_split(trainer, "validation"):
        return None
    datamodule = trainer.datamodule
    selection = datamodule.selection
    metrics = list(dict.fromkeys([*selection.metrics, *selection.guarded]))
    settings = EvaluationSettings(pl_module.evaluation.scoring, datamodule.generation_settings(),
                                  datamodule.judge_settings())
    # steered at the first candidate: a generation task reuses that decoding for its column
    settings = settings.with_steering(vector.at(candidates[0]), extra=candidates)
    scored = settings.steering.grid
    evaluator = Evaluator(pl_module.model, pl_module.tokenizer, settings)
    plain_columns = [Column(m, variant="plain") for m in metrics]
    grid_columns = [[Column(m, candidate=i) for m in metrics] for i in range(len(scored))]
    plain, values = [], []
    for batch in datamodule.selection_dataloader("validation"):
        for record in evaluator.evaluate(batch, pl_module.device):  # the test table's rows
            row = record_row(record)
            plain.append(row_values(row, plain_columns))
            values.append([row_values(row, columns) for columns in grid_columns])
    if not plain:
        return None
    return ValidationScores(metrics, scored, torch.tensor(plain, dtype=torch.float64),
                            torch.tensor(values, dtype=torch.float64))


@torch.no_grad()
def decoded_scores(
    trainer: Trainer, pl_module: LightningModule, vector: SteeringVector, candidate: Candidate,
) -> ValidationScores:
    """The validation split's evaluation items (a generation task's: decoded) plain and at
    ``candidate``, every reported metric: two decodings of the split."""
    datamodule = trainer.datamodule
    settings = EvaluationSettings(pl_module.evaluation.scoring, datamodule.generation_settings(),
                                  datamodule.judge_settings())
    settings = settings.with_steering(vector.at(candidate))
    evaluator = Evaluator(pl_module.model, pl_module.tokenizer, settings)
    metrics = list(datamodule.metric_names)
    columns = {variant: [Column(m, variant=variant) for m in metrics] for variant in ("plain", "steered")}
    plain, steered = [], []
    for batch in datamodule.scoring_dataloader("validation"):
        for record in evaluator.evaluate(batch, pl_module.device):  # the test table's rows
            row = record_row(record)
            plain.append(row_values(row, columns["plain"]))
            steered.append([row_values(row, columns["steered"])])
    return ValidationScores(metrics, [candidate], torch.tensor(plain, dtype=torch.float64),
                            torch.tensor(steered, dtype=torch.float64))
