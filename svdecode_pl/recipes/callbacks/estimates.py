"""The strength estimates of a run, from passes it already makes (see
:mod:`svdecode_pl.steering.estimates`): the calibration pass feeds a second, filtered fit; the
validation split, when there is one, gets a calibration pass (held-out mu*) and one scoring pass
along the mu grid (the strength chosen by the task's metric)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer

from svdecode_pl.evaluation.evaluator import Evaluator
from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.models.zero import full_output_head
from svdecode_pl.steering.calibration import SteeringStatistics, accumulate_calibration
from svdecode_pl.steering.estimates import best_on_curve
from svdecode_pl.steering.vector import SteeringMode, SteeringVector


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


def heldout_mu_star(
    trainer: Trainer, pl_module: LightningModule, mode: SteeringMode, threshold: float, eps: float,
) -> float | None:
    """mu* fitted on the validation split (None without one)."""
    if not has_split(trainer, "validation"):
        return None
    stats = SteeringStatistics(mode, pl_module.vocab_size, threshold).to(pl_module.device)
    calibrate(trainer, pl_module, "validation", [stats])
    return stats.steering_vector(eps=eps).metadata["mu_star"]


@torch.no_grad()
def validation_curve(
    trainer: Trainer, pl_module: LightningModule, vector: SteeringVector, grid: list[float],
) -> tuple[str, list[float | None]]:
    """The task's selection metric on the validation split at each strength of ``grid``, from one
    evaluation pass (every process scores the whole split: the choice is the same everywhere)."""
    datamodule = trainer.datamodule
    metric = datamodule.selection_metric
    settings = EvaluationSettings(pl_module.evaluation.scoring, datamodule.generation_settings(),
                                  datamodule.judge_settings())
    settings.use_steering(vector, grid)
    evaluator = Evaluator(pl_module.model, pl_module.tokenizer, settings)
    sums, counts = [0.0] * len(grid), [0] * len(grid)
    for batch in datamodule.scoring_dataloader("validation"):
        for record in evaluator.evaluate(batch, pl_module.device):
            for index, values in enumerate(record.grid_metrics or []):
                value = values.get(metric)
                if value is not None and math.isfinite(value):
                    sums[index] += value
                    counts[index] += 1
    return metric, [s / c if c else None for s, c in zip(sums, counts)]


def validation_best(
    trainer: Trainer, pl_module: LightningModule, vector: SteeringVector, grid: list[float] | None,
) -> tuple[float | None, dict | None]:
    """The grid strength with the best validation metric, and the curve it was read from."""
    if not grid or not has_split(trainer, "validation"):
        return None, None
    metric, values = validation_curve(trainer, pl_module, vector, grid)
    return best_on_curve(grid, values), {"metric": metric, "mu": list(grid), "values": values}
