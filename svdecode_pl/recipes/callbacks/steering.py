"""Extract the steering vector at the end of warm-start, on the training device; attach it for test
and predict."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from svdecode_pl.recipes.callbacks.estimates import calibrate, heldout_mu_star, validation_best
from svdecode_pl.recipes.host import SteeringHost
from svdecode_pl.recipes.run_unit import fit_provenance, vector_directory
from svdecode_pl.steering.artifact import save_artifact
from svdecode_pl.steering.calibration import SteeringStatistics
from svdecode_pl.steering.estimates import DEFAULT_ESTIMATE, FILTER_THRESHOLD, EstimateName, chosen_strength
from svdecode_pl.steering.provenance import PROVENANCE_KEY, check_vector_belongs
from svdecode_pl.steering.values import check_steering_values
from svdecode_pl.steering.vector import SteeringMode, SteeringVector


class SteeringVectorCallback(Callback):
    """At ``fit`` end, on the device the model trained on: one pass over the calibration data with
    the adapter on and off, the steering direction, its confidence filter, mu* and the other
    strength estimates; then the run's artifacts, written here once: the adapter
    (``<default_root_dir>/adapter``, also with ``enabled=False``) and the vector
    (``<dirpath>/steering``, and inside the adapter directory). At ``test``/``predict`` start: load
    that vector (if the module has no vector yet) and check it matches the model's vocabulary and
    tokenizer.

    Lightning calls ``on_fit_end`` after the strategy's teardown, which moves the module to the CPU
    (and under DeepSpeed may release what it holds); ``on_train_end`` comes before it, but not when
    the fit loop has nothing to train (``max_steps 0``, a run resumed from its last step). So the fit
    end runs right after the fit loop returns, trained or not, while the process group is alive
    (:func:`after_fit_loop`); ``on_fit_end`` only checks that it did.
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
        check_steering_values("--steering.", mu=mu, mu_scale=mu_scale, confidence_threshold=confidence_threshold,
                              eps=eps, filter_threshold=filter_threshold, mu_grid=mu_grid or [])
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
    def extract(self, trainer: Trainer, host: SteeringHost) -> SteeringVector:
        """Stream the calibration split once (sharded over processes) and fit the vector; then the
        strength estimates (see :meth:`estimate`) and the strength chosen among them. Every metric
        state lives on ``host.device`` (float64), where the processes' sums are gathered."""
        model = host.model
        was_training = model.training
        model.eval()
        stats = SteeringStatistics(self.mode, host.vocab_size, self.confidence_threshold).to(host.device)
        filtered = SteeringStatistics(self.mode, host.vocab_size, self.filter_threshold).to(host.device)
        loader = trainer.datamodule.lm_dataloader(self.calibration, rank=trainer.global_rank,
                                                  world_size=trainer.world_size)
        batches = tqdm(loader, desc="Steering vector", unit="batch", leave=False,
                       disable=not (trainer.is_global_zero and plain_progress_bar(trainer)))
        with device_seconds(host.device) as calibration_seconds:
            calibrate(trainer, host, self.calibration, [stats, filtered], batches)
            vector = stats.steering_vector(eps=self.eps, mu=self.mu, mu_scale=self.mu_scale,
                                           metadata=dict(host.metadata, calibration=self.calibration))
        with device_seconds(host.device) as estimate_seconds:
            self.estimate(trainer, host, vector, filtered.steering_vector(eps=self.eps).metadata["mu_star"])
        # where and how long (the first process's clock): a GPU run must show a GPU here
        vector.metadata["extraction"] = {"device": str(host.device), "processes": trainer.world_size,
                                         "calibration_seconds": round(calibration_seconds(), 3),
                                         "estimate_seconds": round(estimate_seconds(), 3)}
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

    # -- the fit end ------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_ended = False
            after_fit_loop(trainer, lambda: self.end_fit(trainer, pl_module))

    def end_fit(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The run's fit end, on the training device: the vector (when enabled), attached to the
        module's evaluation settings, then the adapter and the vector written once."""
        host: SteeringHost = pl_module.steering_host()
        vector = self.extract(trainer, host) if self.enabled else None
        if vector is not None:
            vector.metadata["warm_start_steps"] = trainer.global_step
            host.evaluation.use_steering(vector)
            log_summary(trainer, vector)
        self.write_run(trainer, host, vector)
        self._fit_ended = True

    def write_run(self, trainer: Trainer, host: SteeringHost, vector: SteeringVector | None) -> None:
        """The run's artifacts, by one writer: the adapter (every process calls: collective under
        ZeRO-3), then, on the first process, the vector at ``<dirpath>/steering`` and inside the
        adapter directory (one shareable artifact: ``steering/`` + ``custom_generate/``)."""
        adapter = Path(trainer.default_root_dir) / "adapter"
        host.save_adapter(adapter)
        if vector is not None and trainer.is_global_zero:
            vector.metadata[PROVENANCE_KEY] = fit_provenance(trainer, host, adapter).as_dict()
            path = vector.save(self.artifact_dir(trainer))
            if adapter.is_dir():
                save_artifact(None, vector, adapter)
            rank_zero_info(f"steering vector ({vector}) saved to {path}")
        trainer.strategy.barrier("svdecode-fit-end")  # every process leaves with the artifacts on disk

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not getattr(self, "_fit_ended", False):
            raise RuntimeError("SteeringVectorCallback: the fit end did not run before the strategy's teardown "
                               "(Lightning's fit loop was not wrapped: see after_fit_loop)")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            vars(trainer.fit_loop).pop("run", None)  # the loop's own run again

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        host: SteeringHost = pl_module.steering_host()
        attached = host.evaluation.steering.vector
        if attached is not None:
            host.evaluation.use_steering(attached, self.grid_strengths(attached), scored_estimates(attached))
            return
        path = vector_directory(trainer, pl_module, self.dirpath)
        if not path.exists():
            rank_zero_info(f"no steering vector at {path}: scoring without steering")
            return
        vector = SteeringVector.load(path)
        fingerprint = host.metadata["tokenizer_fingerprint"]
        vector.check_compatible(host.vocab_size, fingerprint, source=str(path / "steering_vector.json"))
        check_vector_belongs(vector.metadata, str(path / "steering_vector.json"),
                             getattr(pl_module.hparams, "adapter_path", None), trainer.ckpt_path is not None)
        self.steer_at(vector)
        host.evaluation.use_steering(vector, self.grid_strengths(vector), scored_estimates(vector))
        rank_zero_info(f"loaded {vector} from {path}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)


def after_fit_loop(trainer: Trainer, end) -> None:
    """Call ``end()`` once Lightning's fit loop returns, before ``Trainer._teardown`` (which moves the
    module to the CPU): after the loop's own end (every ``on_train_end``), and also when the loop had
    nothing to train and called no hook at all (``max_steps 0``; a run resumed from its last step).
    Not after an exception: then nothing of the fit end is written."""
    loop = trainer.fit_loop
    run = type(loop).run.__get__(loop)  # the class's own run, so a second fit does not wrap twice

    def run_then_end() -> None:
        run()
        end()

    loop.run = run_then_end


def log_summary(trainer: Trainer, vector: SteeringVector) -> None:
    """The vector's numbers in the run's loggers (TensorBoard, CSV)."""
    summary = {
        "steering/mu_star": vector.metadata["mu_star"],
        "steering/token_count": float(vector.metadata["token_count"]),
        "steering/filtered_share": vector.metadata["filtered_share"],
    }
    if vector.direction is not None:
        summary["steering/direction_norm"] = float(vector.direction.norm())
    for logger in trainer.loggers:
        logger.log_metrics(summary, step=trainer.global_step)


@contextlib.contextmanager
def device_seconds(device: torch.device) -> Iterator:
    """Wall seconds of the block, the device's queued work included (CUDA synchronised at both ends);
    yields a function that returns them once the block has ended."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start, end = time.perf_counter(), None
    try:
        yield lambda: end - start
    finally:
        synchronize()
        end = time.perf_counter()


def scored_estimates(vector: SteeringVector) -> dict[str, float]:
    """The estimates of a vector that have a value (scored at test beside the curve)."""
    return {k: float(v) for k, v in (vector.metadata.get("estimates") or {}).items() if v is not None}


def plain_progress_bar(trainer: Trainer) -> bool:
    """A tqdm bar of our own only beside Lightning's tqdm bar: under the Rich bar (still drawn at fit
    end) a second bar would be drawn over it."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    return isinstance(trainer.progress_bar_callback, TQDMProgressBar)
