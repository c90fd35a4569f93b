"""A run is one unit: the vector a fit writes records the adapter it was fitted with
(:class:`~svdecode_pl.steering.provenance.RunProvenance`), and ``test``/``predict`` load the vector
that belongs to the adapter they are given."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer

from svdecode_pl.integrations.artifact import STEERING_DIR
from svdecode_pl.recipes.host import SteeringHost
from svdecode_pl.steering.provenance import RunProvenance, adapter_content_hash


def fit_provenance(trainer: Trainer, host: SteeringHost, adapter_dir: Path) -> RunProvenance:
    """The record of the run a fit end is writing (its adapter already on disk)."""
    datamodule = trainer.datamodule
    task = f"{getattr(datamodule, 'task_name', type(datamodule).__name__)}: {getattr(datamodule, 'source', '?')}"
    seed = os.environ.get("PL_GLOBAL_SEED")
    content = adapter_content_hash(adapter_dir)
    return RunProvenance(content, str(adapter_dir) if content else None, str(host.metadata.get("model")), task,
                         int(seed) if seed is not None else None)


def vector_directory(trainer: Trainer, pl_module: LightningModule, dirpath: str | None) -> Path:
    """Where test/predict read the vector (:func:`vector_directory_of`)."""
    return vector_directory_of(trainer.default_root_dir, getattr(pl_module.hparams, "adapter_path", None), dirpath)


def vector_directory_of(root: str | Path, adapter: str | None, dirpath: str | None) -> Path:
    """Where test/predict read the vector: ``--steering.dirpath`` when given; else the vector inside
    ``--model.adapter_path`` (written there by the fit that trained it); else the run directory's."""
    if dirpath:
        return Path(dirpath) / STEERING_DIR
    if adapter and (Path(adapter) / STEERING_DIR / "steering_vector.json").is_file():
        return Path(adapter) / STEERING_DIR
    return Path(root) / STEERING_DIR
