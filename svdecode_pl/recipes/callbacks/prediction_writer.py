"""Per-question prediction records as JSONL, written once across processes and nodes, and resumed
after a kill or a preemption."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from svdecode_pl.utils.errors import UserInputError
from svdecode_pl.utils.files import atomic_write_text


def complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that a writer finished (newline-terminated, valid JSON objects)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]:
        try:
            if isinstance(json.loads(line), dict):
                lines.append(line)
        except json.JSONDecodeError:
            break  # only a torn last line can be invalid; nothing after it is trusted
    return lines


def evaluation_signature(evaluation: Any) -> dict[str, Any]:
    """Everything of the evaluation settings that changes a record: the steering vector (its direction's
    bytes, mode, strength and filter), the strengths scored beside it, and how items decode and are
    judged and scored."""
    if evaluation is None:
        return {}
    steering = evaluation.steering
    vector = steering.vector
    described = None
    if vector is not None:
        direction = None if vector.direction is None else hashlib.sha256(
            vector.direction.contiguous().cpu().numpy().tobytes()).hexdigest()
        described = {"mode": vector.mode, "mu": vector.mu, "confidence_threshold": vector.confidence_threshold,
                     "direction": direction, "provenance": vector.metadata.get("provenance")}
    return {"vector": described, "curves": steering.curves, "candidates": [[c.mode, c.mu] for c in steering.extra],
            "generation": repr(evaluation.generation), "judges": repr(evaluation.judges),
            "scoring": repr(evaluation.scoring)}


def run_signature(trainer: Trainer, pl_module: LightningModule) -> str:
    """A hash of the model's, the data's and the evaluation's settings (strength, mode, decoding): part
    files of a run with other settings are not reused, so a resumed run never mixes two strengths."""
    datamodule = getattr(trainer, "datamodule", None)
    settings = [dict(pl_module.hparams), dict(getattr(datamodule, "hparams", {}) or {}),
                evaluation_signature(getattr(pl_module, "evaluation", None))]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()[:16]


class JSONLPredictionWriter(BasePredictionWriter):
    """Each process appends its records to its own part file as batches finish; at the end the
    first process merges the parts in input order (by ``uid``), drops the duplicates a padding
    sampler creates, and writes ``predictions.jsonl`` atomically.

    Resuming: a run started again with the same command (after SIGKILL, or a SLURM preemption and
    requeue) keeps the complete lines of the part files its predecessor left (a torn last line is
    dropped), and the module skips the questions they hold (:attr:`SVDecodeModule.completed_predictions`),
    on any number of processes. Each part starts with the run's settings signature; parts of
    another run are discarded. A SIGTERM (what SLURM sends on requeue or preemption, before its
    SIGKILL) ends the run after the batch in hand, its records written, with exit status 143. The
    signature covers the steering vector and strength, the mode and the decoding settings: a run
    started again with another ``--steering.strength`` starts over (its predecessor's parts are replaced).
    """

    def __init__(self, output: str | None = None, resume: bool = True) -> None:
        """
        Args:
            output: The JSONL file (default: ``<trainer.default_root_dir>/predictions.jsonl``).
            resume: Reuse the records of an interrupted run of the same command.
        """
        super().__init__(write_interval="batch")
        self.output = output
        self.resume = resume
        self._handle = None
        self._completed: dict[int, str] = {}

    def path(self, trainer: Trainer) -> Path:
        return Path(self.output or Path(trainer.default_root_dir) / "predictions.jsonl")

    def _part(self, trainer: Trainer, rank: int) -> Path:
        path = self.path(trainer)
        return path.with_name(f"{path.name}.part{rank}")

    def _parts(self, trainer: Trainer) -> list[Path]:
        """Every part file present, of this run's ranks or of an earlier run on more processes."""
        path = self.path(trainer)
        pattern = re.compile(re.escape(path.name) + r"\.part\d+")
        return sorted(p for p in path.parent.glob(f"{path.name}.part*") if pattern.fullmatch(p.name))

    def _other_settings(self, trainer: Trainer, signature: str) -> bool:
        """Whether a part file holds records of a run with another signature."""
        for part in self._parts(trainer):
            lines = complete_lines(part)
            if len(lines) > 1 and json.loads(lines[0]).get("run_signature") != signature:
                return True
        return False

    @staticmethod
    def _records(part: Path, signature: str) -> list[str]:
        """The record lines of a part written by a run with this signature."""
        lines = complete_lines(part)
        if not lines or json.loads(lines[0]).get("run_signature") != signature:
            return []
        return lines[1:]

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After every ``on_predict_start`` (the steering callback's attaches the vector, the module's
        the decoding settings), so the run's signature covers what they set."""
        from svdecode_pl.models.zero import zero3_enabled

        part = self._part(trainer, trainer.global_rank)
        part.parent.mkdir(parents=True, exist_ok=True)
        signature = run_signature(trainer, pl_module)
        header = json.dumps({"run_signature": signature})
        if trainer.is_global_zero and self.resume and self._other_settings(trainer, signature):
            print(f"svdecode: note: {self.path(trainer)}.part* were written with other settings (model, data, "
                  "steering strength or mode, or decoding): they are replaced, every record is computed afresh",
                  flush=True)
        # keep this rank's complete records of the same run, drop a torn last line
        kept = self._records(part, signature) if self.resume else []
        atomic_write_text(part, "".join(line + "\n" for line in [header, *kept]))
        trainer.strategy.barrier("prediction_parts_trimmed")
        self._completed = {}
        if self.resume:
            for other in self._parts(trainer):
                for line in self._records(other, signature):
                    record = json.loads(line)
                    self._completed.setdefault(record["uid"], record.get("id"))
        # ranks of a ZeRO-3 model must run the same forward passes: no skipping there
        skip = self._completed and not zero3_enabled(trainer)
        pl_module.completed_predictions = set(self._completed) if skip else set()
        if self._completed:
            what = "skipped" if skip else "recomputed (ZeRO-3 ranks run every forward pass)"
            rank_zero_info(f"resuming predictions: {len(self._completed)} records already written are {what}")
        trainer.strategy.barrier("prediction_parts_read")
        self._handle = part.open("a", encoding="utf-8")

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        for item in batch:
            done_id = self._completed.get(item.uid)
            if done_id is not None and done_id != item.id:
                raise UserInputError(
                    f"{self.path(trainer)}.part*: record uid {item.uid} has id {done_id!r}, the data's has "
                    f"{item.id!r}: part files of another run; delete them and start again")
        for record in prediction:
            self._handle.write(record.to_json() + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if trainer.received_sigterm and not trainer.predict_loop.batch_progress.is_last_batch:
            # SLURM's requeue or preemption (or a kill): stop after this batch, its records kept, as
            # Lightning's fit/validate/test loops stop (its predict loop would run on until SIGKILL,
            # 30 s later by SLURM's default, maybe mid-write); exit status 143, as killed by SIGTERM
            raise SIGTERMException(128 + signal.SIGTERM)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle.close()
        trainer.strategy.barrier("predictions_written")
        if trainer.is_global_zero:
            signature = run_signature(trainer, pl_module)
            records: dict[int, str] = {}
            parts = self._parts(trainer)
            for part in parts:
                for line in self._records(part, signature):
                    records.setdefault(json.loads(line)["uid"], line)
            path = atomic_write_text(self.path(trainer), "".join(records[uid] + "\n" for uid in sorted(records)))
            for part in parts:
                part.unlink()
            print(f"{len(records)} prediction records written to {path}")
        trainer.strategy.barrier("predictions_merged")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            rank_zero_warn(f"interrupted: the records written so far are kept in {self.path(trainer)}.part*; "
                           "run the same command again to resume")
