"""DeepSpeed ZeRO-2/3 on 2 CPU processes (test/CI convenience strategy ``CPUDeepSpeedStrategy``).

The multi-process tests run ``tests/scripts/deepspeed_cpu_lora.py`` in a subprocess (Lightning's subprocess
launcher starts rank 1 from it), then check its outputs here, in a process that never joined the process group.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "deepspeed_cpu_lora.py"
try:
    import svdecode_pl.recipes.strategies  # noqa: F401
except ImportError:  # package not installed: use the work tree
    sys.path.insert(0, str(REPO))

from svdecode_pl.recipes.strategies import CPUDeepSpeedStrategy  # noqa: E402, F401

TINY_QWEN2 = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# variables that would make Lightning think it was launched by torchrun/SLURM/etc. instead of launching rank 1 itself
_LAUNCHER_ENV = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_LAUNCHER_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "PL_")


# ---------------------------------------------------------------------------------------------- fast unit tests
@pytest.fixture
def restore_deepspeed_globals(monkeypatch):
    """CPUDeepSpeedStrategy() switches DeepSpeed to CPU process-wide; undo that for the rest of the session."""
    import deepspeed.accelerator.real_accelerator as real_accelerator
    import deepspeed.ops

    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # records the current value (or absence) for undo
    ops = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(ops, "deepspeed_shm_comm", ops.get("deepspeed_shm_comm", False))


@pytest.mark.usefixtures("restore_deepspeed_globals")
def test_registered_names_resolve_to_cpu_strategy():
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="deepspeed_cpu_stage_3", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    assert strategy.zero_stage_3
    assert strategy.parallel_devices == [torch.device("cpu", 0), torch.device("cpu", 1)]
    assert strategy._process_group_backend == "gloo"
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"


@pytest.mark.usefixtures("restore_deepspeed_globals")
def test_refuses_half_precision_and_config_optimizers():
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(stage=2), precision="bf16-mixed")
    with pytest.raises(RuntimeError, match="32-true"):
        trainer.strategy.setup_environment()  # raises before any process group is created
    with pytest.raises(ValueError, match="config optimizers"):
        CPUDeepSpeedStrategy(config={"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}})
    strategy = CPUDeepSpeedStrategy(stage=3, param_persistence_threshold=0)
    assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.usefixtures("restore_deepspeed_globals")
def test_optimizer_fits_the_strategy():
    """SGD is plain (no momentum); under ZeRO-Offload DeepSpeed accepts only its CPU optimizers, so
    a torch optimizer is never returned there (the DeepSpeedCPUAdam itself is built by the
    offload run in test_distributed: constructing it compiles a C++ op)."""
    import lightning.pytorch as pl

    from svdecode_pl.models.zero import offloads_optimizer
    from svdecode_pl.recipes.optimizer import build_optimizer

    params = [torch.nn.Parameter(torch.ones(2))]
    sgd = build_optimizer(params, "sgd", 0.5, 0.0)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0 and sgd.defaults["lr"] == 0.5
    assert type(build_optimizer(params, "adamw", 1e-3, 0.1)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(params, "adam", 1e-3, 0.0)
    offload = pl.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(stage=3, offload_optimizer=True))
    plain = pl.Trainer(accelerator="cpu", devices=1, strategy=CPUDeepSpeedStrategy(stage=3))
    assert offloads_optimizer(offload) and not offloads_optimizer(plain) and not offloads_optimizer(None)
    assert type(build_optimizer(params, "sgd", 0.5, 0.0, plain)) is torch.optim.SGD
    with pytest.raises(ValueError, match="ZeRO-Offload"):
        build_optimizer(params, "sgd", 0.5, 0.0, offload)


@pytest.mark.usefixtures("restore_deepspeed_globals")
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "strategy").glob("*.yaml")))
def test_strategy_config_fragments_instantiate(name, monkeypatch):
    """Each fragment parses with LightningCLI and builds its Trainer (accelerator forced to CPU: GPU configs can
    only be instantiated here, not run)."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from svdecode_pl.models.zero import offloads_optimizer

    cfg = REPO / "configs" / "strategy" / name
    monkeypatch.setattr(sys, "argv", ["svdecode"])  # LightningCLI warns about pytest's own argv otherwise
    args = ["--config", str(cfg), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]
    cli = LightningCLI(BoringModel, run=False, save_config_callback=None, args=args)
    strategy = cli.trainer.strategy
    if name == "ddp.yaml":
        assert type(strategy) is DDPStrategy
        return
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == (3 if "zero3" in name else 2)
    assert isinstance(strategy, CPUDeepSpeedStrategy) == name.endswith("_cpu.yaml")
    assert ("offload_param" in strategy.config["zero_optimization"]) == ("offload" in name)
    assert offloads_optimizer(cli.trainer) == ("offload" in name)  # SVDecodeModule then returns DeepSpeedCPUAdam
    if name == "deepspeed_zero3_cpu.yaml":  # the tests' ZeRO-3 shards every parameter of the tiny models
        assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0


# ------------------------------------------------------------------------------- 2-process training tests
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2)).save_pretrained(path)
    return path


def _run_script(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # own process group: rank 1 is killed with rank 0 on timeout
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"DeepSpeed CPU run timed out after {timeout}s:\n{out[-6000:]}")
    assert proc.returncode == 0, f"DeepSpeed CPU run failed ({proc.returncode}):\n{out[-6000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "exclude_frozen"),
    [pytest.param(2, True, id="zero2-adapter-only-ckpt"), pytest.param(3, False, id="zero3-full-ckpt")],
)
def test_lora_qwen2_deepspeed_cpu(stage, exclude_frozen, base_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    out = tmp_path / "run"
    args = [
        "--stage",
        str(stage),
        "--base-dir",
        str(base_dir),
        "--out",
        str(out),
        "--steps",
        "3",
        "--resume-steps",
        "2",
    ]
    _run_script(args + (["--exclude-frozen"] if exclude_frozen else []), cwd=tmp_path)
    s = json.loads((out / "summary.json").read_text())

    # training ran on 2 processes, loss finite, adapters moved away from their init
    assert s["world_size"] == 2 and s["stage"] == stage and s["zero3"] == (stage == 3)
    assert s["global_step"] == 3 and len(s["losses"]) == 3
    assert all(math.isfinite(x) for x in s["losses"])
    assert s["lora_B_init_absmax"] == 0.0  # LoRA init really happened (not a no-op on ZeRO-3 shards)
    assert s["adapter_max_change"] > 1e-4

    # only the adapter was trainable: 2 layers x {q_proj, v_proj} x {lora_A, lora_B}
    assert len(s["trainable"]) == 8 and all(".lora_A." in n or ".lora_B." in n for n in s["trainable"])
    assert s["frozen_with_lora_in_name"] == []

    if stage == 3:  # base weights were really partitioned over the 2 ranks
        assert s["sharding"] == {
            "base_param_local_numel": 0,
            "base_param_partition_numel": 2048,
            "base_param_full_numel": 4096,
        }
    # the post-fit forward of the sharded model ran on both ranks and agreed
    assert s["ranks_logits_max_diff"] < 1e-6

    # Lightning checkpoint (DeepSpeed directory) + resume with ckpt_path
    assert s["ckpt_is_dir"]
    assert s["resume_start_global_step"] == 3 and s["resume_final_global_step"] == 5
    assert s["resume_adapter_max_diff"] == 0.0
    assert all(math.isfinite(x) for x in s["resume_losses"])

    # the consolidated adapter is a standard PEFT adapter: same tensors, same logits in this plain process
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(n.replace(".default", "") for n in s["trainable"])
    assert all(t.ndim == 2 and t.numel() > 0 for t in saved.values())
    probe = torch.load(out / "probe_logits.pt")
    base = Qwen2ForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = base(input_ids=probe["probe_ids"]).logits
        model = PeftModel.from_pretrained(base, out / "adapter").eval()
        logits = model(input_ids=probe["probe_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)
    assert (logits - base_logits).abs().max() > 1e-4  # the trained adapter is actually applied

    # the same steps in one plain process (batch = both ranks' micro-batches, plain SGD) give the same adapter:
    # DeepSpeed averages the gradients over the 2 CPU ranks. SGD's update is proportional to the gradient, so summed
    # gradients would double every update, and per-rank-only gradients would change it by far more than the tolerance.
    ref = torch.load(out / "reference.pt")
    lora_config = LoraConfig.from_pretrained(out / "adapter")
    lora_config.inference_mode = False
    model = get_peft_model(Qwen2ForCausalLM.from_pretrained(base_dir), lora_config)
    named = dict(model.train().named_parameters())
    with torch.no_grad():
        for n, v in ref["init_adapter"].items():
            named[n].copy_(v)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ref["lr"])
    assert len(ref["batches"]) == 3 and ref["batches"][0].shape[0] == 8
    for batch in ref["batches"]:
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    updates = {n: named[n.replace(".weight", ".default.weight")].detach() - ref["init_adapter"][
        n.replace(".weight", ".default.weight")] for n in saved}  # what one process did
    scale = max(u.abs().max().item() for u in updates.values())
    assert scale > 1e-2 and all(updates[n].abs().max() > 1e-5 for n in saved if "lora_B" in n)
    for n, v in saved.items():
        update = v - ref["init_adapter"][n.replace(".weight", ".default.weight")]
        torch.testing.assert_close(update, updates[n], rtol=0, atol=1e-4 * scale)
