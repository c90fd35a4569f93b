"""Extract the steering vector at the end of warm-start; attach it for test and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from svdecode_pl.recipes.callbacks.estimates import calibrate, heldout_mu_star, validation_best
from svdecode_pl.steering.calibration import SteeringStatistics
from svdecode_pl.steering.estimates import DEFAULT_ESTIMATE, FILTER_THRESHOLD, EstimateName, chosen_strength
from svdecode_pl.steering.vector import SteeringMode, SteeringVector


class SteeringVectorCallback(Callback):
    """At ``fit`` end: one pass over the calibration data with the adapter on and off, the
    steering direction, its confidence filter and mu*, saved as an artifact next to the
    checkpoints (``<dirpath>/steering``). At ``test``/``predict`` start: load that artifact
    (if the module has no vector yet) and check it matches the model's vocabulary and tokenizer.
    """

    def __init__(
        self,
        enabled: bool = True,
        mode: SteeringMode = "static",
        confidence_threshold: float = 0.0,
        eps: float = 1e-8,
        mu: float | None = None,
        mu_scale: float = 1.0,
        calibration: Literal["train", "validation"] = "train",
        dirpath: str | None = None,
        mu_grid: list[float] | None = None,
        mu_grid_relative: bool = True,
        strength: EstimateName = DEFAULT_ESTIMATE,
        filter_threshold: float = FILTER_THRESHOLD,
    ) -> None:
        """
        Args:
            enabled: Extract and apply a steering vector (false: the warm-started model alone).
            mode: ``static``: one task-level direction, a fixed logit shift; ``dynamic``: the
                direction recomputed at each position from the adapted and base logits.
            confidence_threshold: Vocabulary entries with warm-started probability below this
                are zeroed in the direction (0.0 filters nothing).
            eps: Added to the denominator of mu*.
            mu: A fixed strength that overrides mu* (also when loading an artifact).
            mu_scale: Multiplies the strength (mu* or ``mu``).
            calibration: The data split the vector is extracted from.
            dirpath: Where the ``steering`` artifact goes (default: ``trainer.default_root_dir``).
            mu_grid: Strengths at which ``test`` also scores every question, from the same forward
                pass: the metric as a function of mu, in results.json ``mu_curve`` (null: none).
            mu_grid_relative: ``mu_grid`` values are multiples of mu* (false: absolute strengths).
            strength: The estimate a run steers at (``mu`` overrides it): ``mu_star`` (the paper's),
                ``mu_star_heldout``, ``mu_star_filtered`` or ``validation_best`` (see
                :mod:`svdecode_pl.steering.estimates`; all four are recorded on every run). One that
                cannot be computed (no validation split, no grid) falls back to ``mu_star``.
            filter_threshold: The confidence threshold of ``mu_star_filtered``.
        """
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        self.mode: SteeringMode = mode
        self.confidence_threshold = confidence_threshold
        self.eps = eps
        self.mu = mu
        self.mu_scale = mu_scale
        self.calibration = calibration
        self.dirpath = dirpath
        self.enabled = enabled
        self.mu_grid = None if mu_grid is None else [float(m) for m in mu_grid]
        self.mu_grid_relative = mu_grid_relative
        chosen_strength({"mu_star": 0.0}, strength)  # refuses an unknown name at construction
        self.strength = strength
        self.filter_threshold = filter_threshold

    def grid_strengths(self, vector: SteeringVector) -> list[float] | None:
        """The absolute strengths of ``mu_grid`` for this vector (multiples of its mu*)."""
        if not self.mu_grid:
            return None
        mu_star = vector.metadata.get("mu_star", vector.mu)
        return [m * mu_star + 0.0 for m in self.mu_grid] if self.mu_grid_relative else list(self.mu_grid)

    def artifact_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir) / "steering"

    @torch.no_grad()
    def extract(self, trainer: Trainer, pl_module: LightningModule) -> SteeringVector:
        """Stream the calibration split once (sharded over processes) and fit the vector; then the
        strength estimates (see :meth:`estimate`) and the strength chosen among them."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        stats = SteeringStatistics(self.mode, pl_module.vocab_size, self.confidence_threshold).to(pl_module.device)
        filtered = SteeringStatistics(self.mode, pl_module.vocab_size, self.filter_threshold).to(pl_module.device)
        loader = trainer.datamodule.lm_dataloader(self.calibration, rank=trainer.global_rank,
                                                  world_size=trainer.world_size)
        batches = tqdm(loader, desc="Steering vector", unit="batch", leave=False,
                       disable=not (trainer.is_global_zero and plain_progress_bar(trainer)))
        calibrate(trainer, pl_module, self.calibration, [stats, filtered], batches)
        metadata = pl_module.steering_metadata()
        metadata["calibration"] = self.calibration
        vector = stats.steering_vector(eps=self.eps, mu=self.mu, mu_scale=self.mu_scale, metadata=metadata)
        self.estimate(trainer, pl_module, vector, filtered.steering_vector(eps=self.eps).metadata["mu_star"])
        model.train(was_training)
        return vector

    def estimate(self, trainer: Trainer, pl_module: LightningModule, vector: SteeringVector, filtered: float) -> None:
        """Record every strength estimate in the vector's metadata and steer at the chosen one."""
        mu_star = vector.metadata["mu_star"]
        heldout = mu_star if self.calibration == "validation" else heldout_mu_star(
            trainer, pl_module, self.mode, self.confidence_threshold, self.eps)
        best, curve = validation_best(trainer, pl_module, vector, self.grid_strengths(vector))
        estimates = {"mu_star": mu_star, "mu_star_heldout": heldout, "mu_star_filtered": filtered,
                     "validation_best": best}
        vector.metadata.update(estimates=estimates, validation_curve=curve,
                               filter_threshold=self.filter_threshold)
        self.steer_at(vector)

    def steer_at(self, vector: SteeringVector) -> None:
        """Set the vector's strength: ``mu`` when given, else the ``strength`` estimate (x ``mu_scale``)."""
        estimates = vector.metadata.get("estimates") or {"mu_star": vector.metadata.get("mu_star", vector.mu)}
        name, value = ("mu", self.mu) if self.mu is not None else chosen_strength(estimates, self.strength)
        vector.mu = value * self.mu_scale
        vector.metadata["strength"] = name

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        vector = self.extract(trainer, pl_module)
        vector.metadata["warm_start_steps"] = trainer.global_step
        pl_module.evaluation.use_steering(vector)
        summary = {
            "steering/mu_star": vector.metadata["mu_star"],
            "steering/token_count": float(vector.metadata["token_count"]),
            "steering/filtered_share": vector.metadata["filtered_share"],
        }
        if vector.direction is not None:
            summary["steering/direction_norm"] = float(vector.direction.norm())
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
        if trainer.is_global_zero:
            path = vector.save(self.artifact_dir(trainer))
            rank_zero_info(f"steering vector ({vector}) saved to {path}")

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        attached = pl_module.evaluation.steering.vector
        if attached is not None:
            pl_module.evaluation.use_steering(attached, self.grid_strengths(attached), scored_estimates(attached))
            return
        path = self.artifact_dir(trainer)
        if not path.exists():
            rank_zero_info(f"no steering vector at {path}: scoring without steering")
            return
        vector = SteeringVector.load(path)
        fingerprint = pl_module.steering_metadata()["tokenizer_fingerprint"]
        vector.check_compatible(pl_module.vocab_size, fingerprint, source=str(path / "steering_vector.json"))
        self.steer_at(vector)
        pl_module.evaluation.use_steering(vector, self.grid_strengths(vector), scored_estimates(vector))
        rank_zero_info(f"loaded {vector} from {path}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)


def scored_estimates(vector: SteeringVector) -> dict[str, float]:
    """The estimates of a vector that have a value (scored at test beside the curve)."""
    return {k: float(v) for k, v in (vector.metadata.get("estimates") or {}).items() if v is not None}


def plain_progress_bar(trainer: Trainer) -> bool:
    """A tqdm bar of our own only beside Lightning's tqdm bar: under the Rich bar (still drawn at fit
    end) a second bar would be drawn over it."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    return isinstance(trainer.progress_bar_callback, TQDMProgressBar)
