"""Extract the steering vector at the end of warm-start, on the training device; attach it for test
and predict."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from svdecode_pl.integrations.artifact import save_artifact
from svdecode_pl.recipes.callbacks.estimates import (
    calibrate,
    decoded_scores,
    heldout_mu_stars,
    mode_statistics,
    validation_scores,
)
from svdecode_pl.recipes.host import SteeringHost
from svdecode_pl.recipes.run_unit import fit_provenance, vector_directory
from svdecode_pl.steering.provenance import PROVENANCE_KEY, check_vector_belongs
from svdecode_pl.steering.strength import (
    DEFAULT_RULE,
    FILTER_THRESHOLD,
    MIN_GAIN,
    MODES,
    RULES,
    Candidate,
    ModeEstimates,
    RuleName,
    SelectionMetric,
    SteeringMode,
    absolute_grid,
    choose,
    choose_by_rule,
    confirm,
    describe,
    estimate_candidates,
    grid_candidates,
    rule_candidates,
)
from svdecode_pl.steering.values import check_steering_values
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import OptionError


def _check_options(mode: SteeringMode | None, strength: RuleName | float, **values: Any) -> None:
    """The callback's options, refused before any work starts (the CLI's preflight applies the same rules)."""
    fixed = {} if isinstance(strength, str) else {"strength": strength}
    check_steering_values("--steering.", **fixed, **values)
    if mode not in (None, "static", "dynamic"):
        raise ValueError(f"mode must be 'static', 'dynamic' or null, got {mode!r}")
    if isinstance(strength, str) and strength not in RULES:
        raise ValueError(f"strength must be one of {', '.join(RULES)} or a number, got {strength!r}")
    if strength == "validation" and values["mu_scale"] != 1.0:
        raise ValueError(f"mu_scale {values['mu_scale']} scales an estimate or a fixed strength; strength "
                         "'validation' takes the grid's strengths as they are")


class SteeringVectorCallback(Callback):
    """At ``fit`` end, on the device the model trained on: one pass over the calibration data with
    the adapter on and off, both modes' fits, their confidence filter and mu*, the validation pass
    and the strength choice (:mod:`svdecode_pl.steering.strength`); then the run's artifacts,
    written here once: the adapter (``<default_root_dir>/adapter``, also with ``enabled=False``) and
    the vector (``<dirpath>/steering``, and inside the adapter directory). At ``test``/``predict``
    start: load that vector (if the module has no vector yet), check it matches the model's
    vocabulary and tokenizer, and attach it with the candidates ``test`` scores beside it.

    Lightning calls ``on_fit_end`` after the strategy's teardown, which moves the module to the CPU
    (and under DeepSpeed may release what it holds); ``on_train_end`` comes before it, but not when
    the fit loop has nothing to train (``max_steps 0``, a run resumed from its last step). So the fit
    end runs right after the fit loop returns, trained or not, while the process group is alive
    (:func:`after_fit_loop`); ``on_fit_end`` only checks that it did.
    """

    def __init__(
        self,
        enabled: bool = True,
        mode: SteeringMode | None = None,
        confidence_threshold: float = 0.0,
        eps: float = 1e-8,
        strength: RuleName | float = DEFAULT_RULE,
        mu_scale: float = 1.0,
        calibration: Literal["train", "validation"] = "train",
        dirpath: str | None = None,
        mu_grid: list[float] | None = None,
        mu_grid_relative: bool = True,
        filter_threshold: float = FILTER_THRESHOLD,
        min_gain: float = MIN_GAIN,
    ) -> None:
        """
        Args:
            enabled: Extract and apply a steering vector (false: the warm-started model alone).
            mode: ``static``: one task-level direction, a fixed logit shift; ``dynamic``: the
                direction recomputed at each position from the adapted and base logits; null: chosen
                with the strength on the validation split (static for an explicit strength without one).
            confidence_threshold: Vocabulary entries with warm-started probability below this
                are zeroed in the direction (0.0 filters nothing).
            eps: Added to the denominator of mu*.
            strength: How the strength is chosen (:mod:`svdecode_pl.steering.strength`):
                ``validation`` (the best (mode, mu) of the grid on the validation split, taken only
                where its gain over plain is significant, else mu = 0), ``mu_star`` (the paper's),
                ``mu_star_heldout``, ``mu_star_filtered``, or a number (that strength). Every
                estimate of both modes is recorded on every run.
            mu_scale: Multiplies an estimate's or a fixed strength, once (not with ``validation``).
            calibration: The data split the vector is extracted from.
            dirpath: Where the ``steering`` artifact goes (default: ``trainer.default_root_dir``).
            mu_grid: The strengths the validation split chooses among (in both modes, or the pinned
                one) and at which ``test`` also scores every question in both modes, from the same
                forward pass: results.json ``test_curves`` (null: none).
            mu_grid_relative: ``mu_grid`` values are multiples of each mode's mu* (false: absolute).
            filter_threshold: The confidence threshold of ``mu_star_filtered``.
            min_gain: ``validation`` steers only where the chosen candidate's validation gain of the
                selection metric is at least this (a fraction: 0.01 = one point), besides significant.
        """
        super().__init__()
        _check_options(mode, strength, mu_scale=mu_scale, confidence_threshold=confidence_threshold, eps=eps,
                       filter_threshold=filter_threshold, mu_grid=mu_grid or [], min_gain=min_gain)
        self.mode: SteeringMode | None = mode
        self.confidence_threshold = confidence_threshold
        self.eps = eps
        self.strength = strength if isinstance(strength, str) else float(strength)
        self.mu_scale = mu_scale
        self.calibration = calibration
        self.dirpath = dirpath
        self.enabled = enabled
        self.mu_grid = None if mu_grid is None else [float(m) for m in mu_grid]
        self.mu_grid_relative = mu_grid_relative
        self.filter_threshold = filter_threshold
        self.min_gain = min_gain

    @property
    def modes(self) -> tuple[SteeringMode, ...]:
        """The modes the choice is made among (the pinned one, or both)."""
        return (self.mode,) if self.mode else MODES

    def artifact_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir) / "steering"

    @torch.no_grad()
    def extract(self, trainer: Trainer, host: SteeringHost) -> SteeringVector:
        """Stream the calibration split once (sharded over processes) and fit both modes (and their
        filtered fits); then the strength choice (:meth:`choose`). Every metric state lives on
        ``host.device`` (float64), where the processes' sums are gathered."""
        model = host.model
        was_training = model.training
        model.eval()
        stats = mode_statistics(host, self.confidence_threshold)
        filtered = mode_statistics(host, self.filter_threshold)
        loader = trainer.datamodule.lm_dataloader(self.calibration, rank=trainer.global_rank,
                                                  world_size=trainer.world_size)
        batches = tqdm(loader, desc="Steering vector", unit="batch", leave=False,
                       disable=not (trainer.is_global_zero and plain_progress_bar(trainer)))
        with device_seconds(host.device) as calibration_seconds:
            calibrate(trainer, host, self.calibration, [*stats.values(), *filtered.values()], batches)
            fitted = {mode: s.steering_vector(eps=self.eps, metadata=dict(host.metadata, calibration=self.calibration))
                      for mode, s in stats.items()}
        with device_seconds(host.device) as estimate_seconds:
            fits = {mode: (fitted[mode].mu, filtered[mode].steering_vector(eps=self.eps).mu) for mode in MODES}
            vector = self.choose(trainer, host, fitted["static"], fits)
        # where and how long (the first process's clock): a GPU run must show a GPU here
        extraction = {"device": str(host.device), "processes": trainer.world_size,
                      "calibration_seconds": round(calibration_seconds(), 3),
                      "estimate_seconds": round(estimate_seconds(), 3), **vector.metadata.get("extraction", {})}
        model.train(was_training)
        return vector.with_metadata(filter_threshold=self.filter_threshold, mu_star=fitted[vector.mode].mu,
                                    extraction=extraction)

    def choose(self, trainer: Trainer, pl_module: LightningModule, vector: SteeringVector,
               fits: dict[str, tuple[float, float]]) -> SteeringVector:
        """Every mode's estimates (``fits``: mode -> (mu*, filtered mu*)), the validation pass and
        the choice; the vector steering at it, carrying the record."""
        heldout = {m: mu for m, (mu, _) in fits.items()} if self.calibration == "validation" else \
            heldout_mu_stars(trainer, pl_module, self.confidence_threshold, self.eps)
        estimates = {m: ModeEstimates(mu, None if heldout is None else heldout[m], filtered)
                     for m, (mu, filtered) in fits.items()}
        grid = grid_candidates(self.mu_grid, self.mu_grid_relative, estimates, self.modes)
        offered = [] if self.strength == "validation" else \
            rule_candidates(self.strength, estimates, self.modes, self.mu_scale)
        selection = trainer.datamodule.selection
        with device_seconds(pl_module.device) as validation_seconds:
            scores = validation_scores(trainer, pl_module, vector, list(dict.fromkeys([*grid, *offered])))
            choice = choose(self.strength, scores, selection, grid, estimates, self.mode, self.mu_scale,
                            self.min_gain)
            if selection.source == "references" and choice.rule == "validation" and choice.guard_passed:
                choice = confirm(choice, decoded_scores(trainer, pl_module, vector, choice.candidate), self.mode)
        rank_zero_info(describe(choice))
        return vector.chosen(choice).with_metadata(extraction={"validation_seconds": round(validation_seconds(), 3)})

    def rechosen(self, vector: SteeringVector) -> SteeringVector:
        """A loaded vector at this callback's explicit strength when its record holds another (e.g.
        ``svdecode test --steering.strength -3``); ``validation`` keeps the recorded choice (the
        validation pass runs at fit end), and refuses a pinned mode the record does not have."""
        choice = vector.choice
        if self.strength == "validation":
            if self.mode is not None and choice is not None and choice.mode != self.mode:
                raise OptionError(f"--steering.mode {self.mode}: the vector was chosen in mode {choice.mode} "
                                  f"({choice.rule} rule); pin the mode at fit, or give an explicit --steering.strength")
            return vector
        rule = "fixed" if isinstance(self.strength, float) else self.strength
        modes = tuple(m for m in self.modes if m in vector.modes)
        same = choice is not None and choice.rule == rule and choice.mode in modes and choice.mu_scale == self.mu_scale
        if same and (rule != "fixed" or choice.mu == self.strength * self.mu_scale):
            return vector
        estimates = choice.estimates if choice is not None else {}
        return vector.chosen(choose_by_rule(self.strength, None, SelectionMetric(()), estimates, modes, self.mu_scale))

    def test_candidates(self, vector: SteeringVector) -> tuple[dict[str, list[float]], list[Candidate]]:
        """What ``test`` scores besides plain and steered: the grid in every mode the vector has
        (the strength curves) and every mode's estimates."""
        estimates = vector.choice.estimates if vector.choice is not None else {}
        curves = {mode: absolute_grid(self.mu_grid, self.mu_grid_relative, estimates.get(mode, ModeEstimates()).mu_star)
                  for mode in vector.modes}
        return {m: c for m, c in curves.items() if c}, list(estimate_candidates(estimates).values())

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
            vector = vector.with_metadata(warm_start_steps=trainer.global_step)
            log_summary(trainer, vector)
        vector = self.write_run(trainer, host, vector)
        if vector is not None:
            host.attach_steering(vector, *self.test_candidates(vector))
        self._fit_ended = True

    def write_run(self, trainer: Trainer, host: SteeringHost, vector: SteeringVector | None) -> SteeringVector | None:
        """The run's artifacts, by one writer: the adapter (every process calls: collective under
        ZeRO-3), then, on the first process, the vector at ``<dirpath>/steering`` and inside the
        adapter directory (one shareable artifact: ``steering/`` + ``custom_generate/``). The vector
        as written (the first process's records the run's provenance)."""
        adapter = Path(trainer.default_root_dir) / "adapter"
        host.save_adapter(adapter)
        if vector is not None and trainer.is_global_zero:
            vector = vector.with_metadata(**{PROVENANCE_KEY: fit_provenance(trainer, host, adapter).as_dict()})
            path = vector.save(self.artifact_dir(trainer))
            if adapter.is_dir():
                save_artifact(None, vector, adapter)
            rank_zero_info(f"steering vector ({vector}) saved to {path}")
        trainer.strategy.barrier("svdecode-fit-end")  # every process leaves with the artifacts on disk
        return vector

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
            host.attach_steering(attached, *self.test_candidates(attached))
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
        vector = self.rechosen(vector)
        host.attach_steering(vector, *self.test_candidates(vector))
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


def plain_progress_bar(trainer: Trainer) -> bool:
    """A tqdm bar of our own only beside Lightning's tqdm bar: under the Rich bar (still drawn at fit
    end) a second bar would be drawn over it."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    return isinstance(trainer.progress_bar_callback, TQDMProgressBar)
