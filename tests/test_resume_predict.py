"""``svdecode predict`` killed with SIGKILL (or preempted as SLURM does it: SIGUSR1, Lightning's
checkpoint and requeue, then the kill) and started again with the same command skips the records
already written and ends with every record once, equal to an uninterrupted run, for scoring (1 and
2 processes) and generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdecode_pl.models.heads import output_vocab_size
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.recipes.callbacks.prediction_writer import complete_lines
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mc": ROOT / "configs" / "quickstart.yaml", "gen": ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"}
# 26 questions, half warm-start: 13 test questions, 3 a batch (5 batches; 3 a process on 2)
DATA = ["--data.synthetic_questions", "26", "--data.eval_batch_size", "3", "--data.train_fraction", "0.5",
        "--data.val_fraction", "0"]
TASK_ARGS = {"mc": [], "gen": ["--data.generation.max_new_tokens", "6"]}

KILLER = '''
import os, signal
from lightning.pytorch import Callback


class KillAfterBatches(Callback):
    """Interrupt the run once ``batches`` predict batches are written, the first time only.
    ``kill``: SIGKILL the whole run (every rank); ``preempt``: first SIGUSR1, as SLURM's
    ``--signal=SIGUSR1@90`` before the end, then SIGKILL; ``sigterm``: only SIGTERM (what SLURM's
    requeue sends first), the run left to stop itself."""

    def __init__(self, batches: int = 2, marker: str = "killed", how: str = "kill") -> None:
        self.batches, self.marker, self.how = batches, marker, how

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 >= self.batches and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if self.how == "preempt":
                os.kill(os.getpid(), signal.SIGUSR1)  # Lightning's handler: hpc checkpoint, scontrol requeue
            os.killpg(os.getpgid(0), signal.SIGKILL)
'''

pytestmark = pytest.mark.slow


def predict(run_dir: Path, task: str, devices: int, *extra: str, env_extra: dict | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update(env_extra or {})
    env["OMP_NUM_THREADS"] = "1" if devices > 1 else env.get("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(run_dir.parent), env.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "svdecode_pl.cli", "predict", "--config", str(CONFIGS[task]), *DATA, *TASK_ARGS[task],
        "--trainer.default_root_dir", str(run_dir), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter", *extra,
    ]
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "predict.log").open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                                   start_new_session=True)
        try:
            return process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise


def with_steering(run_dir: Path) -> Path:
    """A fixed random steering vector in the run directory: the records carry steered scores too."""
    vocab = output_vocab_size(load_causal_lm("svdecode-tiny"))
    generator = torch.Generator().manual_seed(0)
    SteeringVector(torch.randn(vocab, generator=generator), 0.5, metadata={"vocab_size": vocab}).save(
        run_dir / "steering")
    return run_dir


class UninterruptedRuns(dict):
    """The records of an uninterrupted run of each task, run on first use."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, task: str) -> list[dict]:
        run_dir = with_steering(self.tmp_path_factory.mktemp(f"straight_{task}"))
        assert predict(run_dir, task, 1) == 0, (run_dir / "predict.log").read_text()[-3000:]
        self[task] = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
        return self[task]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> UninterruptedRuns:
    return UninterruptedRuns(tmp_path_factory)


def slurm_job(tmp_path: Path) -> dict[str, str]:
    """The environment of a one-task SLURM job, with an ``scontrol`` that records the requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "predict",
            "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize(("task", "devices", "how"), [("mc", 1, "kill"), ("mc", 2, "kill"), ("gen", 1, "kill"),
                                                      ("mc", 1, "preempt"), ("mc", 1, "sigterm")])
def test_killed_predict_resumes_to_the_uninterrupted_records(tmp_path, straight, task, devices, how):
    (tmp_path / "killer.py").write_text(KILLER)
    run_dir = with_steering(tmp_path / "run")
    marker = tmp_path / "killed"
    kill_after = 2 if devices == 1 else 1
    killer = ["--trainer.callbacks+=killer.KillAfterBatches", "--trainer.callbacks.batches", str(kill_after),
              "--trainer.callbacks.marker", str(marker), "--trainer.callbacks.how", how]
    env = slurm_job(tmp_path) if how == "preempt" else None
    code = predict(run_dir, task, devices, *killer, env_extra=env)
    # SIGTERM: the run ends itself after the next batch, its records written (exit status 128 + 15)
    expected = 128 + signal.SIGTERM if how == "sigterm" else -signal.SIGKILL
    assert code == expected and marker.exists(), (run_dir / "predict.log").read_text()[-3000:]
    if how == "sigterm":
        assert "interrupted: the records written so far are kept" in (run_dir / "predict.log").read_text()
    if how == "preempt":  # Lightning saved its checkpoint and asked SLURM to requeue the job
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
        assert (run_dir / "hpc_ckpt_1.ckpt").exists()
    assert not (run_dir / "predictions.jsonl").exists()
    parts = sorted(run_dir.glob("predictions.jsonl.part*"))
    written = [json.loads(line)["uid"] for part in parts for line in complete_lines(part)[1:]]
    assert 0 < len(written) < len(straight[task])
    with parts[0].open("a") as handle:  # a line torn by the kill
        handle.write('{"uid": 12, "id": "torn", "scor')

    # the same command again: the killer's marker exists, so it runs to the end
    assert predict(run_dir, task, devices, *killer, env_extra=env) == 0, (run_dir / "predict.log").read_text()[-3000:]
    log = (run_dir / "predict.log").read_text()
    assert f"resuming predictions: {len(set(written))} records already written are skipped" in log
    resumed = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in resumed] == [r["uid"] for r in straight[task]]  # each once, in input order
    assert resumed == straight[task]
    assert not [p for p in run_dir.iterdir() if ".part" in p.name or p.name.endswith(".tmp")]


def test_resumed_with_another_strength_starts_over(tmp_path, straight):
    """Killed at ``--steering.strength 2`` and started again at the vector's own strength: the records of
    the first strength are not kept (they were, beside the second's: the signature hashed the model
    and data settings only); the result equals an uninterrupted run at the second strength."""
    (tmp_path / "killer.py").write_text(KILLER)
    run_dir = with_steering(tmp_path / "run")
    killer = ["--trainer.callbacks+=killer.KillAfterBatches", "--trainer.callbacks.batches", "2",
              "--trainer.callbacks.marker", str(tmp_path / "killed")]
    assert predict(run_dir, "mc", 1, *killer, "--steering.strength", "2.0") == -signal.SIGKILL
    assert len(complete_lines(run_dir / "predictions.jsonl.part0")) > 1
    assert predict(run_dir, "mc", 1, *killer) == 0, (run_dir / "predict.log").read_text()[-3000:]
    log = (run_dir / "predict.log").read_text()
    assert "resuming predictions" not in log and "were written with other settings" in log
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert records == straight["mc"]


def test_writer_keeps_complete_lines_only(tmp_path):
    part = tmp_path / "predictions.jsonl.part0"
    part.write_text('{"run_signature": "x"}\n{"uid": 0}\n{"uid": 1}\n{"uid": 2, "sc')
    assert complete_lines(part) == ['{"run_signature": "x"}', '{"uid": 0}', '{"uid": 1}']
    part.write_bytes(b'{"uid": 0}\n\xff\xfe{"uid"\n{"uid": 5}\n')
    assert complete_lines(part) == ['{"uid": 0}']  # nothing after a damaged line is trusted
