"""BENCHMARK HELPER: the floor the fit end's extraction is compared with: one forward pass of the
calibration data through the adapted and the base model (full logits, nothing else), on the training
device, timed at the warm-start's end (fastest of ``passes``, CUDA synchronised).

Added to a ``svdecode fit`` with ``--trainer.callbacks+=benchmarks.fit_end_probe.ForwardFloor`` (run
from the repository root, which is then on ``sys.path``); writes ``<default_root_dir>/forward_floor.json``
on the first process. ``benchmarks/device_check.py`` puts it beside the extraction's own time, which
the vector's metadata records (``extraction.calibration_seconds``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from svdecode_pl.models.heads import adapter_disabled
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback, device_seconds


class ForwardFloor(Callback):
    """Times the calibration split's forward passes in ``on_train_end`` (before the fit end's extraction)."""

    def __init__(self, passes: int = 2) -> None:
        self.passes = passes

    @torch.no_grad()
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        host = pl_module.steering_host()
        steering = next(c for c in trainer.callbacks if isinstance(c, SteeringVectorCallback))
        loader = trainer.datamodule.lm_dataloader(steering.calibration, rank=trainer.global_rank,
                                                  world_size=trainer.world_size)
        batches = list(loader)
        model, was_training = host.model, host.model.training
        model.eval()
        seconds = []
        for _ in range(self.passes):
            with device_seconds(host.device) as elapsed:
                for batch in batches:
                    ids, mask = batch["input_ids"].to(host.device), batch["attention_mask"].to(host.device)
                    model(input_ids=ids, attention_mask=mask)
                    with adapter_disabled(model):
                        model(input_ids=ids, attention_mask=mask)
            seconds.append(round(elapsed(), 4))
        model.train(was_training)
        if trainer.is_global_zero:
            tokens = sum(int(batch["target_mask"].sum()) for batch in batches)
            record = {"seconds": min(seconds), "passes": seconds, "calibration_tokens": tokens,
                      "batches": len(batches), "device": str(host.device)}
            Path(trainer.default_root_dir, "forward_floor.json").write_text(json.dumps(record))
