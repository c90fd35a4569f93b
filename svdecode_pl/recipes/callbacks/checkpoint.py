"""ModelCheckpoint whose default folder is ``<default_root_dir>/checkpoints``."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, but checkpoints land in ``<default_root_dir>/checkpoints``
    (not in the logger's versioned folder), so a requeued or resumed job finds ``last.ckpt``
    at a fixed place."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
