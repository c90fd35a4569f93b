"""The fit end runs where the training ran (issue 25), guarded on the CPU.

- The extraction, the estimates and the writing of the adapter and the vector happen before the
  strategy's teardown, whether the fit loop trained, had nothing to train (``max_steps 0``) or was
  resumed at its last step. The teardown here moves the module off its device (to ``meta``, as a GPU
  strategy moves it to the CPU): anything of the fit end after it fails or is recorded after it.
- Every metric state gathered at the fit end lives on the training device: a stand-in for NCCL
  refuses any tensor from another device than the one it was given (the strategy's root device),
  and the sums stay float64. CPU tensors cannot be told apart from one another, so on the CPU this
  catches a state put on any other device; a state left on the CPU while the model is on a GPU is
  what ``tests/test_gpu.py`` (``ddp`` with one device: a real NCCL group) catches there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies.strategy import Strategy

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.steering.calibration import SteeringStatistics
from svdecode_pl.steering.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


def fit_args(run_dir: Path, *extra: str) -> list[str]:
    """A short fit of the tiny model with a validation split (held-out mu* and the curve run too)."""
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.name_or_path", "svdecode-tiny",
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
            "--data.synthetic_questions", "16", "--data.train_fraction", "0.5", "--data.val_fraction", "0.25",
            "--data.eval_batch_size", "4", "--steering.mu_grid", "[-1.0, 0.0, 1.0]", *extra]


@pytest.fixture
def events(monkeypatch) -> list[tuple]:
    """What happened at the fit end, in order: each extraction (with the device it ran on), each
    writing of the run's artifacts, each strategy teardown; the teardown then moves the module to
    ``meta``, off the device it trained on."""
    seen: list[tuple] = []
    teardown, extract, write_run = Strategy.teardown, SteeringVectorCallback.extract, SteeringVectorCallback.write_run

    def teardown_off_device(self) -> None:
        seen.append(("teardown",))
        module = self.lightning_module
        teardown(self)
        if module is not None:
            module.to("meta")

    def recorded_extract(self, trainer, host):
        seen.append(("extract", str(host.device), str(next(host.model.parameters()).device)))
        return extract(self, trainer, host)

    def recorded_write(self, trainer, host, vector):
        seen.append(("write",))
        return write_run(self, trainer, host, vector)

    monkeypatch.setattr(Strategy, "teardown", teardown_off_device)
    monkeypatch.setattr(SteeringVectorCallback, "extract", recorded_extract)
    monkeypatch.setattr(SteeringVectorCallback, "write_run", recorded_write)
    return seen


def assert_one_run_written(run_dir: Path) -> SteeringVector:
    vector = SteeringVector.load(run_dir / "steering")
    shared = SteeringVector.load(run_dir / "adapter" / "steering")
    assert torch.equal(shared.direction, vector.direction) and shared.mu == vector.mu
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert vector.metadata["extraction"]["device"] == "cpu" and vector.metadata["extraction"]["processes"] == 1
    assert vector.metadata["extraction"]["calibration_seconds"] > 0
    # the validation passes ran too: both modes' held-out fits, and the choice on the validation split
    assert all(e.mu_star_heldout is not None for e in vector.choice.estimates.values())
    assert vector.choice.rule == "validation" and vector.choice.validation_gain is not None
    return vector


def test_fit_end_runs_before_the_teardown(tmp_path, events):
    """A fit that trains: extraction and writing on the CPU, then the teardown."""
    run_cli(fit_args(tmp_path, "--trainer.max_steps", "2"))
    assert events == [("extract", "cpu", "cpu"), ("write",), ("teardown",)]
    assert assert_one_run_written(tmp_path).metadata["warm_start_steps"] == 2


def test_fit_end_runs_before_the_teardown_when_nothing_is_trained(tmp_path, events):
    """Lightning's fit loop calls no hook when it has nothing to train: extraction only from an
    adapter (``max_steps 0``), and a run resumed from the checkpoint of its last step (a job
    requeued while it was extracting)."""
    run_cli(fit_args(tmp_path / "warm", "--trainer.max_steps", "2"))
    events.clear()
    adapter = str(tmp_path / "warm" / "adapter")
    run_cli(fit_args(tmp_path / "extract", "--trainer.max_steps", "0", "--model.adapter_path", adapter))
    assert events == [("extract", "cpu", "cpu"), ("write",), ("teardown",)]
    assert_one_run_written(tmp_path / "extract")
    events.clear()
    last = tmp_path / "warm" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    (tmp_path / "warm" / "steering" / "steering_vector.json").unlink()
    run_cli(fit_args(tmp_path / "warm", "--trainer.max_steps", "2", "--ckpt_path", str(last)))
    assert events == [("extract", "cpu", "cpu"), ("write",), ("teardown",)]
    assert assert_one_run_written(tmp_path / "warm").metadata["warm_start_steps"] == 2


def test_the_module_writes_nothing_at_fit_end():
    """One writer of the run's artifacts (the callback): the module has no fit-end hook that could
    write in an order Lightning decides."""
    from lightning.pytorch import LightningModule

    assert SVDecodeModule.on_fit_end is LightningModule.on_fit_end
    assert SVDecodeModule.on_train_end is LightningModule.on_train_end


@pytest.fixture
def nccl_stand_in(monkeypatch) -> list[tuple[str, torch.dtype]]:
    """Every SteeringStatistics believes it runs on several processes and gathers through a function
    that, like NCCL, refuses a tensor from another device than the training device (the strategy's
    root device, read when the module lends itself to the callback). Returns (device, dtype) of
    each gathered state."""
    gathered: list[tuple[str, torch.dtype]] = []
    training_device: list[torch.device] = []
    init, host = SteeringStatistics.__init__, SVDecodeModule.steering_host

    def recorded_host(self):
        training_device[:] = [self.trainer.strategy.root_device]
        return host(self)

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        (device,) = training_device
        if tensor.device != device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type} "
                               f"(the process group is on {device})")
        gathered.append((str(tensor.device), tensor.dtype))
        return [tensor]  # a world of one: the sums are this process's

    def distributed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.distributed_available_fn = lambda: True
        self.dist_sync_fn = gather

    monkeypatch.setattr(SVDecodeModule, "steering_host", recorded_host)
    monkeypatch.setattr(SteeringStatistics, "__init__", distributed_init)
    return gathered


def test_gathered_states_live_on_the_training_device(tmp_path, nccl_stand_in):
    """The calibration pass's four fits (both modes, plain and filtered: 6 + 4 sums each) and the
    held-out pass's two (6 + 4) gather their sums (30 today; at least the calibration pass's 20
    whatever the estimates become), all float64, all on the device the model trained on."""
    run_cli(fit_args(tmp_path, "--trainer.max_steps", "1"))
    assert len(nccl_stand_in) >= 2 * (6 + 4)
    assert set(nccl_stand_in) == {("cpu", torch.float64)}
    vector = SteeringVector.load(tmp_path / "steering")
    assert vector.metadata["token_count"] > 0
    assert all(e.mu_star_heldout is not None for e in vector.choice.estimates.values())


def test_filtered_share_is_of_every_process():
    """The filtered share is read from the gathered sums, not this process's own: two processes
    holding the same sums have the share of one (counts and filtered entries both double)."""
    torch.manual_seed(0)
    adapted, base = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    one = SteeringStatistics("static", 11, confidence_threshold=0.1)
    one.update(adapted, base.clone(), targets)
    two = SteeringStatistics("static", 11, confidence_threshold=0.1)
    two.distributed_available_fn = lambda: True
    two.dist_sync_fn = lambda tensor, group=None: [tensor, tensor.clone()]
    two.update(adapted, base.clone(), targets)
    share = one.steering_vector().metadata["filtered_share"]
    assert 0 < share < 1
    vector = two.steering_vector()
    assert vector.metadata["token_count"] == 10
    assert vector.metadata["filtered_share"] == pytest.approx(share, rel=1e-12)


def test_run_written_once_without_steering(tmp_path):
    """``steering.enabled false``: the callback still writes the adapter (and no vector)."""
    run_cli(fit_args(tmp_path, "--trainer.max_steps", "1", "--steering.enabled", "false"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "steering").exists() and not (tmp_path / "adapter" / "steering").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
