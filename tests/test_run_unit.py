"""A run is one unit (issue 29, class 1): the vector records the adapter it was fitted with and
test/predict use the vector that belongs to the adapter given; a run directory holds one run, written
by one command at a time; a checkpoint of another kind, model or PEFT method is refused; predict's
resume signature covers the strength, the mode and the decoding settings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import small_run_args
from safetensors.torch import save_file

from svdecode_pl.cli.entry import main, run_cli
from svdecode_pl.cli.run_directory import check_checkpoint, check_evaluation_target, check_fit_target
from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.settings import EvaluationSettings
from svdecode_pl.recipes.callbacks.prediction_writer import evaluation_signature
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.recipes.run_unit import vector_directory
from svdecode_pl.steering.provenance import RunProvenance, adapter_content_hash, check_vector_belongs
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import CheckpointError, OptionError, SteeringArtifactError, user_error_message
from svdecode_pl.utils.run_lock import LOCK_FILE, RunLock, RunLockedError, lock_run_directory, release_run_locks

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def fake_adapter(path: Path, fill: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "m"}))
    save_file({"w": torch.full((4,), fill)}, str(path / "adapter_model.safetensors"))
    return path


# -- the lock -----------------------------------------------------------------------------------


def test_second_writer_is_refused_and_released_lock_is_free(tmp_path):
    first = RunLock(tmp_path, "fit")
    first.acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["command"] == "fit"
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path, "test").acquire()
    message = user_error_message(info.value)
    assert f"svdecode fit (pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    assert f"delete {tmp_path / LOCK_FILE}" in message
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(tmp_path, "test")
    second.acquire()
    second.release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "fit"}))
    lock = RunLock(tmp_path, "fit")
    lock.acquire()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"the lock of pid {dead.pid} (fit" in err[0] and "taken over" in err[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    # a live process on another host cannot be checked: refused, with the way out
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "predict"}))
    with pytest.raises(RunLockedError, match=r"svdecode predict \(pid 1 on elsewhere"):
        RunLock(tmp_path, "fit").acquire()


def test_only_the_first_process_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    lock_run_directory(tmp_path, "fit")  # another rank of the same run: no lock of its own
    assert not (tmp_path / LOCK_FILE).exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    lock_run_directory(tmp_path, "fit")
    assert (tmp_path / LOCK_FILE).exists()
    release_run_locks()
    assert not (tmp_path / LOCK_FILE).exists()


# -- what a run directory may hold ---------------------------------------------------------------


def test_fit_into_a_finished_or_interrupted_run_is_refused(tmp_path):
    check_fit_target(tmp_path / "new", None)
    fake_adapter(tmp_path / "done" / "adapter", 1.0)
    (tmp_path / "done" / "checkpoints").mkdir()
    (tmp_path / "done" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(OptionError) as info:
        check_fit_target(tmp_path / "done", None)
    assert user_error_message(info.value) == (
        f"--trainer.default_root_dir {tmp_path / 'done'}: holds a finished run ({tmp_path / 'done' / 'adapter'}); "
        f"fit into a new directory, or continue it with --ckpt_path {tmp_path / 'done' / 'checkpoints' / 'last.ckpt'}")
    check_fit_target(tmp_path / "done", "last")  # asked to continue
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cut" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(OptionError, match=r"holds an interrupted fit \(.*last.ckpt\); resume it with --ckpt_path "):
        check_fit_target(tmp_path / "cut", None)


def test_results_of_an_adapter_are_not_written_into_another_run(tmp_path):
    own = fake_adapter(tmp_path / "run" / "adapter", 1.0)
    check_evaluation_target(tmp_path / "run", str(own))
    check_evaluation_target(tmp_path / "run", str(fake_adapter(tmp_path / "copy" / "adapter", 1.0)))  # same content
    check_evaluation_target(tmp_path / "fresh", str(own))
    other = fake_adapter(tmp_path / "other" / "adapter", 2.0)
    with pytest.raises(OptionError) as info:
        check_evaluation_target(tmp_path / "run", str(other))
    assert user_error_message(info.value).startswith(
        f"--trainer.default_root_dir {tmp_path / 'run'}: holds another run (its adapter {own} is not "
        f"--model.adapter_path {other})")


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_of_another_kind_model_or_peft_method_is_refused(tmp_path):
    adapter = fake_adapter(tmp_path / "adapter", 1.0)
    text = tmp_path / "notes.yaml"
    text.write_text("steering:\n  mu: 1\n")
    cases = {adapter / "adapter_model.safetensors": "a safetensors file", text: "a text file"}
    for path, kind in cases.items():
        with pytest.raises(CheckpointError, match=f"--ckpt_path {path}: {kind}"):
            check_checkpoint(path, "svdecode-mini", "peft.LoraConfig")
    torch.save({"state_dict": {}, "hyper_parameters": {"name_or_path": "svdecode-tiny"}}, tmp_path / "tiny.ckpt")
    with pytest.raises(CheckpointError, match="a checkpoint of model 'svdecode-tiny', not --model.name_or_path"):
        check_checkpoint(tmp_path / "tiny.ckpt", "svdecode-mini", "peft.LoraConfig")
    torch.save({"state_dict": {}, "svdecode_run": {"name_or_path": "svdecode-mini", "peft": "IA3Config"}},
               tmp_path / "ia3.ckpt")
    with pytest.raises(CheckpointError, match="a checkpoint of a IA3Config adapter, not of --model.peft peft.Lora"):
        check_checkpoint(tmp_path / "ia3.ckpt", "svdecode-mini", "peft.LoraConfig")
    check_checkpoint(tmp_path / "ia3.ckpt", "svdecode-mini", "peft.IA3Config")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        check_checkpoint(tmp_path / "list.ckpt", "svdecode-mini", None)


def test_checkpoint_weights_must_be_this_models_trainable_weights():
    from peft import IA3Config, LoraConfig, get_peft_model

    from svdecode_pl.models.adapters import check_checkpoint_weights
    from svdecode_pl.models.loading import load_causal_lm

    lora = get_peft_model(load_causal_lm("svdecode-tiny"), LoraConfig(r=4, target_modules=["q_proj"]))
    own = {f"model.{n}": p.detach() for n, p in lora.named_parameters() if p.requires_grad}
    check_checkpoint_weights(lora, own, "x.ckpt")
    ia3 = get_peft_model(load_causal_lm("svdecode-tiny"), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    other = {f"model.{n}": p.detach() for n, p in ia3.named_parameters() if p.requires_grad}
    with pytest.raises(CheckpointError, match=r"--ckpt_path x.ckpt: a checkpoint of another model or PEFT method"):
        check_checkpoint_weights(lora, other, "x.ckpt")
    wider = {name: torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 1) for name, tensor in own.items()}
    with pytest.raises(CheckpointError, match=r"has shape .*: a checkpoint of another model"):
        check_checkpoint_weights(lora, wider, "x.ckpt")


# -- the vector that belongs to the adapter ------------------------------------------------------


def test_vector_of_another_adapter_is_refused(tmp_path):
    mine, theirs = fake_adapter(tmp_path / "a" / "adapter", 1.0), fake_adapter(tmp_path / "b" / "adapter", 2.0)
    record = RunProvenance(adapter_content_hash(mine), str(mine), "svdecode-mini", "truthfulqa_mc: x", 0)
    metadata = {"provenance": record.as_dict()}
    assert RunProvenance.of(metadata) == record and RunProvenance.of({}) is None
    check_vector_belongs(metadata, "v.json", str(mine))
    check_vector_belongs({}, "v.json", str(theirs))  # a vector written before the record: as before
    with pytest.raises(SteeringArtifactError) as info:
        check_vector_belongs(metadata, "v.json", str(theirs))
    assert user_error_message(info.value).startswith(
        f"v.json: field 'provenance.adapter_sha256': fitted with the adapter {mine} ({record.adapter_sha256[:12]}), "
        f"not with --model.adapter_path {theirs}")
    with pytest.raises(SteeringArtifactError, match=f"but no adapter is loaded: pass --model.adapter_path {mine}"):
        check_vector_belongs(metadata, "v.json", None)
    check_vector_belongs(metadata, "v.json", None, weights_from_checkpoint=True)


def test_callback_refuses_the_vector_of_another_adapter(tmp_path):
    """A Trainer built by hand (no ``svdecode`` preflight): the callback checks the vector it loads."""
    from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback

    mine, theirs = fake_adapter(tmp_path / "a" / "adapter", 1.0), fake_adapter(tmp_path / "b" / "adapter", 2.0)
    record = RunProvenance(adapter_content_hash(theirs), str(theirs), "m", "t", 0).as_dict()
    SteeringVector(torch.ones(4), 1.0, metadata={"provenance": record}).save(tmp_path / "run" / "steering")
    attached = []
    host = SimpleNamespace(vocab_size=4, metadata={"tokenizer_fingerprint": None}, evaluation=EvaluationSettings(),
                           attach_steering=lambda vector, curves, extra: attached.append(vector))
    module = SimpleNamespace(hparams=SimpleNamespace(adapter_path=str(mine)), steering_host=lambda: host)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"), ckpt_path=None)
    with pytest.raises(SteeringArtifactError, match=f"fitted with the adapter {theirs}"):
        SteeringVectorCallback()._attach(trainer, module)
    module.hparams.adapter_path = str(theirs)
    SteeringVectorCallback()._attach(trainer, module)
    assert len(attached) == 1 and attached[0].metadata["provenance"] == record


def test_the_adapters_own_vector_comes_first(tmp_path):
    adapter = fake_adapter(tmp_path / "x" / "adapter", 1.0)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "y"))
    module = SimpleNamespace(hparams=SimpleNamespace(adapter_path=str(adapter)))
    assert vector_directory(trainer, module, None) == tmp_path / "y" / "steering"  # the adapter has none
    SteeringVector(torch.ones(4), 1.0).save(adapter / "steering")
    assert vector_directory(trainer, module, None) == adapter / "steering"
    assert vector_directory(trainer, module, str(tmp_path / "z")) == tmp_path / "z" / "steering"  # asked for


def test_resume_signature_covers_strength_mode_and_decoding():
    base = SteeringVector(torch.ones(4), 1.0)

    def signature(vector=base, generation=None, curves=None):
        settings = EvaluationSettings(generation=generation).with_steering(vector, curves)
        return json.dumps(evaluation_signature(settings), sort_keys=True, default=repr)

    same = signature()
    assert signature() == same
    assert signature(base.with_mu(5.0)) != same
    assert signature(SteeringVector(torch.ones(4) * 2, 1.0)) != same
    assert signature(SteeringVector(None, 1.0, mode="dynamic", metadata={"vocab_size": 4})) != same
    assert signature(generation=GenerationSettings(max_new_tokens=4)) != signature(
        generation=GenerationSettings(max_new_tokens=5))
    assert signature(curves={"static": [1.0]}) != same
    assert signature(curves={"static": [1.0]}) != signature(curves={"dynamic": [1.0]})


# -- through the command --------------------------------------------------------------------------


def small(run_dir: Path, *extra: str) -> list[str]:
    return small_run_args(QUICKSTART, run_dir, 12, "--model.name_or_path", "svdecode-tiny",
                          "--trainer.logger", "false", "--steering.mu_grid", "null", *extra)


def one_line_exit(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("svdecode: error: "), err
    return err[0][len("svdecode: error: "):]


@pytest.mark.slow
def test_two_runs_stay_apart(tmp_path, capsys, monkeypatch):
    """Two fits (two seeds) in two directories: each vector records its own adapter; test of run A's
    adapter into run B's directory, with B's vector, and a second fit into A are refused in one line."""
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli(["fit", *small(a, "--trainer.max_steps", "2")])
    run_cli(["fit", *small(b, "--trainer.max_steps", "2", "--seed_everything", "1")])
    for vector_dir in (a / "steering", a / "adapter" / "steering"):
        record = RunProvenance.of(SteeringVector.load(vector_dir).metadata)
        assert record.adapter_sha256 == adapter_content_hash(a / "adapter") and record.seed == 0
        assert record.base_model == "svdecode-tiny" and record.task.startswith("truthfulqa_mc: ")
    assert not (a / LOCK_FILE).exists()  # released at the command's end
    adapter_a = ["--model.adapter_path", str(a / "adapter")]
    assert one_line_exit(capsys, "test", *small(b, *adapter_a)).startswith(
        f"--trainer.default_root_dir {b}: holds another run")
    with monkeypatch.context() as patched:  # refused before any model loads
        patched.setattr(SVDecodeModule, "configure_model", lambda self: pytest.fail("the model was loaded"))
        refused = one_line_exit(capsys, "test", *small(tmp_path / "c", *adapter_a, "--steering.dirpath", str(b)))
    assert refused.startswith(
        f"{b / 'steering' / 'steering_vector.json'}: field 'provenance.adapter_sha256': fitted with the adapter")
    assert not (tmp_path / "c" / "results.json").exists()
    assert one_line_exit(capsys, "fit", *small(a, "--trainer.max_steps", "2")).startswith(
        f"--trainer.default_root_dir {a}: holds a finished run")
    # LightningCLI would read the checkpoint's hyper-parameters into the config: svdecode-tiny, silently
    other_model = small(tmp_path / "d", "--model.name_or_path", "svdecode-tiny-256",
                        "--ckpt_path", str(a / "checkpoints" / "last.ckpt"))
    assert one_line_exit(capsys, "fit", *other_model).startswith(
        f"--ckpt_path {a / 'checkpoints' / 'last.ckpt'}: a checkpoint of model 'svdecode-tiny', not")
    run_cli(["test", *small(a, *adapter_a)])  # the run's own adapter and vector
    assert json.loads((a / "results.json").read_text())["steering"] is not None
