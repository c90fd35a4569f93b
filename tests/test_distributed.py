"""1 process vs 2 (DDP, DeepSpeed ZeRO-2/3 on CPU with gloo): same steering vector, same metrics,
same warm-started adapter (plain SGD, every ZeRO-3 parameter sharded); a fit killed with SIGKILL in
the middle of an epoch resumes to the adapter of an uninterrupted run.

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

from svdecode_pl.steering.strength import ESTIMATES
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "zero2": ["--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero2_cpu.yaml")],
    "zero3": ["--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero3_cpu.yaml")],
}
# 26 questions, half warm-start: 13 calibration and 13 test questions (odd, so one of two
# processes gets one more and a padding sampler would count a question twice).
DATA = ["--data.synthetic_questions", "26", "--data.batch_size", "4", "--data.eval_batch_size", "3",
        "--data.train_fraction", "0.5", "--data.val_fraction", "0"]

def cli(run_dir: Path, *args: str, devices: int = 1, timeout: int = 400, wait: bool = True, data: list[str] = DATA):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1" if devices > 1 else env.get("OMP_NUM_THREADS", "2")
    command = [
        sys.executable, "-m", "svdecode_pl.cli", args[0], "--config", QUICKSTART, *args[1:], *data,
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


#: extraction only (max_steps 0) from the warm-started adapter, with a validation split (held-out mu*
#: and the validation curve run too) and a confidence filter (its filtered share is gathered too)
EXTRACT_DATA = [*DATA, "--data.val_fraction", "0.25"]


def extract(run_dir: Path, adapter: Path, *args: str, devices: int = 1) -> SteeringVector:
    cli(run_dir, "fit", "--model.adapter_path", str(adapter), "--trainer.max_steps", "0",
        "--steering.confidence_threshold", "0.001", *args, devices=devices, data=EXTRACT_DATA)
    return SteeringVector.load(run_dir / "steering")


@pytest.fixture(scope="module")
def one_process_vector(tmp_path_factory, adapter) -> SteeringVector:
    return extract(tmp_path_factory.mktemp("one"), adapter)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_steering_vector_same_on_one_and_two_processes(tmp_path, adapter, one_process_vector, strategy):
    """Extraction on 2 processes from the same adapter: one vector, written once (``steering/`` and
    inside the adapter), the same as one process's to 1e-6 (float64 sums of per-token float32 terms;
    the processes' batches are padded differently), its metadata naming the device and the processes
    of the pass."""
    one, two = one_process_vector, extract(tmp_path / "two", adapter, *STRATEGIES[strategy], devices=2)
    assert one.metadata["token_count"] > 0 and 0 < one.metadata["filtered_share"] < 1
    assert_same_vector(one, two, rtol=1e-6)
    for key in ("mu_star", "filtered_share"):
        assert two.metadata[key] == pytest.approx(one.metadata[key], rel=1e-6, abs=1e-12), key
    assert list(one.choice.estimates) == ["static", "dynamic"]
    for mode, found in one.choice.estimates.items():  # both modes' mu*, held-out and filtered estimates
        for name in ESTIMATES:
            value = found.get(name)
            assert value is not None and two.choice.estimates[mode].get(name) == pytest.approx(value, rel=1e-6), name
    assert (two.choice.mode, two.choice.mu, two.choice.guard_passed) == (one.choice.mode, one.choice.mu,
                                                                         one.choice.guard_passed)
    extraction = {run.metadata["extraction"]["processes"]: run.metadata["extraction"]["device"] for run in (one, two)}
    assert set(extraction) == {1, 2} and all(device.startswith("cpu") for device in extraction.values())
    shared = SteeringVector.load(tmp_path / "two" / "adapter" / "steering")
    assert torch.equal(shared.direction, two.direction) and shared.metadata == two.metadata
    assert not [p for p in (tmp_path / "two").rglob("*") if ".tmp" in p.name or ".part" in p.name]


@pytest.mark.slow
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


@pytest.mark.slow
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


def one_process_reference(
    steps: int, args: list[str], world_size: int = 2, optimizer_type: type = torch.optim.SGD
) -> dict[str, torch.Tensor]:
    """The adapter after ``steps`` optimizer steps in this one process, each on the gradient of the
    mean of the ``world_size`` ranks' batch losses (what averaging data-parallel gradients gives)."""
    from lightning.pytorch import LightningDataModule

    from svdecode_pl.cli.lightning import SVDecodeCLI
    from svdecode_pl.recipes.module import SVDecodeModule

    cli_args = ["--config", QUICKSTART, *args, *DATA, "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    parsed = SVDecodeCLI(SVDecodeModule, LightningDataModule, subclass_mode_data=True, run=False, args=cli_args,
                         save_config_callback=None)
    module, data = parsed.model, parsed.datamodule
    module.configure_model()
    module.setup("fit")
    data.setup("fit")
    loaders = [data.lm_dataloader("train", shuffle=True, rank=r, world_size=world_size) for r in range(world_size)]
    optimizer = module.configure_optimizers()
    assert type(optimizer) is optimizer_type and not optimizer.defaults.get("momentum")
    module.model.train()
    done, epoch = 0, 0
    while done < steps:
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        for batches in zip(*loaders):
            loss = sum(module.answer_loss(batch) for batch in batches) / world_size
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
        epoch += 1
    return {name.replace(".default", ""): p.detach().clone()
            for name, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_data_parallel_warm_start_matches_one_process(tmp_path):
    """Warm-start 3 plain-SGD steps on 2 processes under DDP, ZeRO-2 and ZeRO-3 (every parameter
    sharded): each adapter is the one of the same steps in one process. SGD's update is
    proportional to the gradient, so gradients summed instead of averaged over the processes would
    double every update; ZeRO-3 also has to gather the sharded adapter to save it."""
    sgd = ["--model.optimizer", "sgd", "--model.learning_rate", "0.5", "--model.peft.init_args.lora_dropout", "0"]
    probe = "--trainer.callbacks+=tests.scripts.sharding_probe.ShardingProbe"
    expected = one_process_reference(3, sgd)
    initial = one_process_reference(0, sgd)
    updates = {key: value - initial[key] for key, value in expected.items()}
    scale = max(u.abs().max().item() for u in updates.values())
    assert scale > 1e-2 and all(updates[k].abs().max() > 1e-4 for k in updates if "lora_B" in k)
    for name in ("ddp", "zero2", "zero3"):
        run_dir = tmp_path / name
        cli(run_dir, "fit", "--trainer.max_steps", "3", *sgd, *STRATEGIES[name], probe, devices=2)
        adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        assert adapter.keys() == expected.keys(), name
        for key in expected:
            torch.testing.assert_close(adapter[key] - initial[key], updates[key], rtol=0, atol=1e-4 * scale,
                                       msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
        sharding = json.loads((run_dir / "sharding.json").read_text())
        assert sharding["world_size"] == 2 and sharding["adapter"] == len(expected)
        assert sharding["optimizer"] == "SGD"
        if name == "zero3":  # after a step, every base and adapter parameter is still a partition on each process
            assert sharding["base_sharded"] == sharding["base"] > 0 and sharding["persistent"] == 0
            assert sharding["adapter_sharded"] == sharding["adapter"]
        else:
            assert sharding["base_sharded"] == sharding["adapter_sharded"] == 0


@pytest.mark.slow
def test_zero3_offload_config_trains_with_the_cpu_adam(tmp_path):
    """configs/strategy/deepspeed_zero3_offload.yaml as shipped, but on CPU processes (fp32, no
    pinned memory): the module returns DeepSpeedCPUAdam (DeepSpeed refuses a torch optimizer under
    offload) and the adapter is that of the same AdamW steps in one process. The first run on a
    machine compiles DeepSpeed's cpu_adam op (minutes; then cached in ~/.cache/torch_extensions)."""
    adamw = ["--model.learning_rate", "0.01", "--model.peft.init_args.lora_dropout", "0"]
    offload = ["--config", str(ROOT / "configs" / "strategy" / "deepspeed_zero3_offload.yaml"),
               "--trainer.strategy.class_path", "svdecode_pl.strategies.CPUDeepSpeedStrategy",
               "--trainer.strategy.init_args.pin_memory", "false", "--trainer.precision", "32-true",
               "--trainer.strategy.init_args.param_persistence_threshold", "0"]
    run_dir = tmp_path / "offload"
    cli(run_dir, "fit", "--trainer.max_steps", "2", *adamw, *offload,
        "--trainer.callbacks+=tests.scripts.sharding_probe.ShardingProbe", devices=2, timeout=900)
    probe = json.loads((run_dir / "sharding.json").read_text())
    assert probe["optimizer"] == "DeepSpeedCPUAdam" and probe["offload_optimizer"]
    assert probe["base_sharded"] == probe["base"] > 0 and probe["persistent"] == 0  # ZeRO-3, parameters offloaded
    expected = one_process_reference(2, adamw, optimizer_type=torch.optim.AdamW)
    initial = one_process_reference(0, adamw, optimizer_type=torch.optim.AdamW)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == expected.keys()
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-3  # it trained
    for key, value in expected.items():
        torch.testing.assert_close(adapter[key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_killed_fit_resumes_mid_epoch_to_the_uninterrupted_adapter(tmp_path):
    """SIGKILL after a checkpoint taken in the middle of an epoch; resuming from it ends where a
    run that was never interrupted ends (same seed): the resumed epoch skips the batches already
    trained on, in the same shuffled order, and dropout draws the same masks."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: svdecode_pl.callbacks.RunCheckpoint\n"
        "      init_args: {save_last: true, save_top_k: -1, every_n_train_steps: 3}\n"
    )
    fit = ["fit", "--config", str(callbacks), "--trainer.max_epochs", "3", "--trainer.max_steps", "-1",
           "--model.peft.init_args.lora_dropout", "0.1"]
    cli(tmp_path / "straight", *fit)
    run_dir = tmp_path / "killed"
    process = cli(run_dir, *fit, wait=False)
    # 13 sequences / batch 4 = 4 steps an epoch: step 6 is the 2nd of epoch 1's 4 batches; once
    # step 9's checkpoint appears, step 6's is complete
    resume_from = run_dir / "checkpoints" / "epoch=1-step=6.ckpt"
    following = run_dir / "checkpoints" / "epoch=2-step=9.ckpt"
    deadline = time.time() + 300
    while not following.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert resume_from.exists() and not (run_dir / "adapter").exists(), "the run was not killed mid-fit"
    progress = torch.load(resume_from, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert progress["current"]["processed"] == 2, "the checkpoint is not mid-epoch"
    cli(run_dir, *fit, "--ckpt_path", str(resume_from))
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_resumable_loader_skips_the_batches_trained_on():
    """The loader state of a checkpoint taken after 2 of an epoch's 4 batches: a new loader given
    that state hands out the other 2, in the epoch's order, without touching torch's global RNG;
    a state taken at the end of an epoch skips nothing of the next."""
    from torch.utils.data import DistributedSampler

    from svdecode_pl.tasks.resumable import ResumableDataLoader

    def loader() -> ResumableDataLoader:
        sampler = DistributedSampler(range(16), num_replicas=2, rank=1, shuffle=True, seed=3)
        return ResumableDataLoader(range(16), batch_size=2, sampler=sampler)

    first = loader()
    first.sampler.set_epoch(5)
    epoch = list(first)
    assert len(epoch) == 4 and first.state_dict() == {"batches_yielded": 0}  # a whole epoch: nothing to skip
    iterator = iter(first)
    seen = [next(iterator), next(iterator)]
    assert first.state_dict() == {"batches_yielded": 2}
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    resumed.sampler.set_epoch(5)
    rng = torch.get_rng_state()
    rest = list(resumed)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [b.tolist() for b in seen + rest] == [b.tolist() for b in epoch]
    assert resumed.state_dict() == {"batches_yielded": 0} and len(list(resumed)) == 4  # the next epoch is whole
