"""The console's progress bar: Lightning's rich bar, named after the phase it shows."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class PhaseProgressBar(RichProgressBar):
    """``Warm-start`` (with the epoch only when the run counts epochs) instead of ``Epoch 5/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return "Warm-start"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return f"Warm-start, epoch {current_epoch + 1}/{trainer.max_epochs}"
        return "Warm-start"
