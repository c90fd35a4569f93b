"""1 process vs 2 (DDP, DeepSpeed ZeRO-2/3 on CPU with gloo): same steering vector, same metrics;
a fit killed with SIGKILL resumes to the adapter of an uninterrupted run.

Multi-process runs go through the real `svdecode` CLI in a subprocess (Lightning's launcher
re-runs the command for rank 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdecode_pl.steering import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "zero2": ["--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero2_cpu.yaml")],
    "zero3": ["--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero3_cpu.yaml")],
}
# 26 questions, half warm-start: 13 calibration and 13 test questions (odd, so one of two
# processes gets one more and a padding sampler would count a question twice).
DATA = ["--data.synthetic_questions", "26", "--data.batch_size", "4", "--data.eval_batch_size", "3"]

pytestmark = pytest.mark.slow


def cli(run_dir: Path, *args: str, devices: int = 1, timeout: int = 400, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1" if devices > 1 else env.get("OMP_NUM_THREADS", "2")
    command = [
        sys.executable, "-m", "svdecode_pl.cli", args[0], "--config", QUICKSTART, *args[1:], *DATA,
        "--trainer.default_root_dir", str(run_dir), "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / f"{args[0]}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    if not wait:
        return process
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert code == 0, (run_dir / f"{args[0]}.log").read_text()[-3000:]
    return process


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An adapter warm-started for a few steps on one process."""
    run_dir = tmp_path_factory.mktemp("warm")
    cli(run_dir, "fit", "--trainer.max_steps", "4")
    return run_dir / "adapter"


def assert_same_vector(a: SteeringVector, b: SteeringVector, rtol: float) -> None:
    assert a.metadata["token_count"] == b.metadata["token_count"]
    torch.testing.assert_close(b.direction, a.direction, rtol=rtol, atol=rtol * a.direction.abs().max().item())
    assert b.mu == pytest.approx(a.mu, rel=rtol)


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_steering_vector_same_on_one_and_two_processes(tmp_path, adapter, strategy):
    """Extraction only (max_steps 0) from the same adapter: the reduced sums are the same."""
    extract = ["fit", "--model.adapter_path", str(adapter), "--trainer.max_steps", "0"]
    cli(tmp_path / "one", *extract)
    cli(tmp_path / "two", *extract, *STRATEGIES[strategy], devices=2)
    one, two = SteeringVector.load(tmp_path / "one" / "steering"), SteeringVector.load(tmp_path / "two" / "steering")
    assert one.metadata["token_count"] > 0
    assert_same_vector(one, two, rtol=1e-5)


def test_metrics_same_on_one_and_two_processes(tmp_path, adapter):
    test = ["test", "--model.adapter_path", str(adapter)]
    (tmp_path / "one").mkdir()
    vector = SteeringVector.load(adapter.parent / "steering")
    for run in ("one", "two"):
        vector.save(tmp_path / run / "steering")
    cli(tmp_path / "one", *test)
    cli(tmp_path / "two", *test, "--trainer.strategy", "ddp", devices=2)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["n_examples"] == two["n_examples"] == 13
    assert two["world_size"] == 2
    for name in ("mc1", "mc2", "mc3"):
        for variant in ("plain", "steered"):
            assert two["metrics"][name][variant] == pytest.approx(one["metrics"][name][variant], abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if "results" in p.name) == ["results.json"]


def test_predict_writes_each_record_once_in_input_order(tmp_path, adapter):
    """13 questions on 2 processes: the padding sampler hands one question to both; the merged
    predictions.jsonl has each question once, in input order, with the 1-process scores."""
    predict = ["predict", "--model.adapter_path", str(adapter),
               "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"]
    vector = SteeringVector.load(adapter.parent / "steering")
    records = {}
    for run, extra, devices in (("one", [], 1), ("two", ["--trainer.strategy", "ddp"], 2)):
        vector.save(tmp_path / run / "steering")
        cli(tmp_path / run, *predict, *extra, devices=devices)
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        records[run] = [json.loads(line) for line in lines]
        assert not [p for p in (tmp_path / run).iterdir() if ".part" in p.name or ".tmp" in p.name]
    uids = [r["uid"] for r in records["two"]]
    assert len(uids) == 13 and uids == sorted(set(uids))
    assert uids == [r["uid"] for r in records["one"]]
    for one, two in zip(records["one"], records["two"]):
        assert one["choice"] == two["choice"]
        for variant in ("plain", "steered"):
            assert two["scores"][variant] == pytest.approx(one["scores"][variant], abs=1e-5)


def test_deepspeed_zero_warm_start_matches_ddp(tmp_path):
    """Warm-start 3 steps on 2 processes under DDP, ZeRO-2 and ZeRO-3: the adapters, steering
    vectors and test metrics agree (ZeRO-3 reduces gradients in another order: rtol 1e-3)."""
    vectors, adapters = {}, {}
    for name in ("ddp", "zero2", "zero3"):
        run_dir = tmp_path / name
        cli(run_dir, "fit", "--trainer.max_steps", "3", *STRATEGIES[name], devices=2)
        vectors[name] = SteeringVector.load(run_dir / "steering")
        adapters[name] = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for name in ("zero2", "zero3"):
        assert adapters[name].keys() == adapters["ddp"].keys()
        for key, value in adapters["ddp"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-3, atol=1e-4)
        assert_same_vector(vectors["ddp"], vectors[name], rtol=1e-3)
    assert any(v.abs().max() > 0 for k, v in adapters["zero3"].items() if "lora_B" in k)  # it did train


def test_killed_fit_resumes_to_the_uninterrupted_adapter(tmp_path):
    """SIGKILL after the epoch-2 checkpoint; resuming from last.ckpt ends where a run that was
    never interrupted ends (same seed)."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: svdecode_pl.callbacks.RunCheckpoint\n"
        "      init_args: {save_last: true, save_top_k: -1, every_n_epochs: 1}\n"
    )
    fit = ["fit", "--config", str(callbacks), "--trainer.max_epochs", "6", "--trainer.max_steps", "-1",
           "--model.peft.init_args.lora_dropout", "0.1"]
    cli(tmp_path / "straight", *fit)
    run_dir = tmp_path / "killed"
    process = cli(run_dir, *fit, wait=False)
    # 13 sequences / batch 4 = 4 steps an epoch; once epoch 3's checkpoint appears, epoch 2's is complete
    resume_from = run_dir / "checkpoints" / "epoch=1-step=8.ckpt"
    following = run_dir / "checkpoints" / "epoch=2-step=12.ckpt"
    deadline = time.time() + 300
    while not following.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert resume_from.exists() and not (run_dir / "adapter").exists(), "the run was not killed mid-fit"
    cli(run_dir, *fit, "--ckpt_path", str(resume_from))
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
