"""A user's mistake is one line and exit status 2, a bug keeps its traceback; steering artifacts
and adapters are checked field by field; writes are atomic.

The console-script tests run the real ``svdecode`` on each bad input (a few at a time, in
parallel) and assert the one line, the file/record/field it names, exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import mc_records
from peft import PeftModel
from safetensors.torch import save_file

from svdecode_pl.cli.entry import main
from svdecode_pl.models.adapters import check_adapter, load_checked_adapter
from svdecode_pl.models.heads import output_vocab_size
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.steering.vector import FORMAT_VERSION, SteeringVector
from svdecode_pl.utils.errors import (
    AdapterError,
    DataFormatError,
    OptionError,
    SteeringArtifactError,
    UserInputError,
    user_error_message,
)
from svdecode_pl.utils.files import atomic_directory, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


# -- classification ---------------------------------------------------------------------------


def test_user_errors_are_one_line_and_bugs_are_none():
    assert user_error_message(DataFormatError("a.json: record 3: field 'x': missing")) == (
        "a.json: record 3: field 'x': missing")
    assert user_error_message(FileNotFoundError(2, "No such file or directory", "nope.json")) == (
        "nope.json: No such file or directory")
    assert user_error_message(ZeroDivisionError("division by zero")) is None
    assert user_error_message(KeyError("uid")) is None
    try:  # wrapped (as Lightning or jsonargparse may): the user's error is found in the chain
        try:
            raise DataFormatError("b.csv: header: missing column 'Question'\nmore detail")
        except DataFormatError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert user_error_message(outer) == "b.csv: header: missing column 'Question'"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"do_sample": True, "temperature": 0.0}, "sampling needs temperature > 0, got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be >= 0 (0: off), got -1"),
    ({"num_beams": 0}, "num_beams must be >= 1, got 0"),
])
def test_generation_settings_are_option_errors(settings, expected):
    """A bad ``--data.generation.*`` value is the user's: one line (``svdecode`` exits with 2, not
    a 100-line jsonargparse traceback)."""
    from svdecode_pl.decoding.generation import GenerationSettings

    with pytest.raises(OptionError) as caught:
        GenerationSettings(**settings)
    assert user_error_message(caught.value) == f"generation settings: {expected}"


def test_main_turns_user_errors_into_one_line_and_keeps_bugs(monkeypatch, capsys):
    import svdecode_pl.cli.entry as cli

    def user_mistake(args):
        raise DataFormatError("x.json: record 1: field 'question': missing or empty")

    monkeypatch.setattr(cli, "run_cli", user_mistake)
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["test"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "svdecode: error: x.json: record 1: field 'question': missing or empty\n"
    with pytest.raises(DataFormatError):  # --debug: the traceback
        main(["test", "--debug"])
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)

    def bug(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "run_cli", bug)
    with pytest.raises(ZeroDivisionError):
        main(["test"])


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2013984000 bytes. Error code 12 (Cannot allocate memory)"),
    type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ..."),
    MemoryError(),
])
def test_out_of_memory_is_one_line_with_what_to_lower(monkeypatch, capsys, error):
    """An input too large for the memory ended in a 77-line traceback; now one line naming the
    options that bound memory (the traceback with --debug)."""
    import svdecode_pl.cli.entry as cli

    def run(args):
        raise error

    monkeypatch.setattr(cli, "run_cli", run)
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["test"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("svdecode: error: out of memory"), err
    assert "lower --data.eval_batch_size, --model.score_batch_tokens or --model.chunk_tokens" in err[0]
    if not isinstance(error, MemoryError):
        assert "(an allocation of " in err[0]
    with pytest.raises(type(error)):
        main(["test", "--debug"])
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)


@pytest.mark.parametrize("outcome", ["finished", "user error", "bug"])
def test_main_destroys_the_process_group_before_exit(monkeypatch, tmp_path, outcome):
    """A rank that leaves gloo's group to the interpreter's teardown can abort after a finished
    fit (seen under srun: "terminate called without an active exception", the job FAILED)."""
    import torch.distributed as dist

    import svdecode_pl.cli.entry as cli

    def run(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert dist.is_initialized()
        if outcome == "user error":
            raise DataFormatError("x.json: record 1: field 'question': missing or empty")
        if outcome == "bug":
            raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "run_cli", run)
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    if outcome == "finished":
        main(["fit"])
    else:
        with pytest.raises((SystemExit, ZeroDivisionError)):
            main(["fit"])
    assert not dist.is_initialized()


# -- steering artifacts -----------------------------------------------------------------------


def _artifact(tmp_path: Path, vocab: int = 17) -> Path:
    meta = {"model": "m", "vocab_size": vocab, "tokenizer_fingerprint": "abc", "token_count": 9}
    return SteeringVector(torch.randn(vocab), -1.5, metadata=meta).save(tmp_path / "steering")


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "steering_vector.json").read_text())
    meta.update(changes)
    (path / "steering_vector.json").write_text(json.dumps(meta))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


STEERING_CASES = {
    "missing json": (lambda p: (p / "steering_vector.json").unlink(), "steering_vector.json: not found"),
    "missing safetensors": (lambda p: (p / "steering_vector.safetensors").unlink(),
                            "steering_vector.safetensors: not found"),
    "truncated safetensors": (
        lambda p: _truncate(p / "steering_vector.safetensors", 70),
        "steering_vector.safetensors: truncated or corrupt safetensors file"),
    "corrupt safetensors": (lambda p: (p / "steering_vector.safetensors").write_bytes(b"\x00garbage" * 20),
                            "steering_vector.safetensors: truncated or corrupt safetensors file"),
    "wrong shape": (lambda p: save_file({"direction": torch.zeros(4, 5)}, str(p / "steering_vector.safetensors")),
                    "tensor 'direction': shape (4, 5), expected (17,)"),
    "wrong size": (lambda p: save_file({"direction": torch.zeros(16)}, str(p / "steering_vector.safetensors")),
                   "tensor 'direction': shape (16,), expected (17,)"),
    "wrong dtype": (lambda p: save_file({"direction": torch.zeros(17, dtype=torch.float16)},
                                        str(p / "steering_vector.safetensors")),
                    "tensor 'direction': dtype torch.float16, expected float32"),
    "nan": (lambda p: save_file({"direction": torch.tensor([float("nan")] * 2 + [0.0] * 15)},
                                str(p / "steering_vector.safetensors")),
            "tensor 'direction': 2 NaN or infinite entries"),
    "inf": (lambda p: save_file({"direction": torch.tensor([float("inf")] + [0.0] * 16)},
                                str(p / "steering_vector.safetensors")),
            "tensor 'direction': 1 NaN or infinite entries"),
    "unknown mode": (lambda p: _edit_meta(p, mode="sideways"), "field 'mode': unknown mode 'sideways'"),
    "newer format": (lambda p: _edit_meta(p, format_version=FORMAT_VERSION + 1),
                     f"field 'format_version': {FORMAT_VERSION + 1}: written by a newer svdecode"),
    "mu not a number": (lambda p: _edit_meta(p, mu="big"), "field 'mu': expected a finite number"),
    "json not json": (lambda p: (p / "steering_vector.json").write_text("{mode: static"),
                      "steering_vector.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(STEERING_CASES))
def test_steering_artifact_errors_name_file_and_field(tmp_path, case):
    path = _artifact(tmp_path)
    corrupt, expected = STEERING_CASES[case]
    corrupt(path)
    with pytest.raises(SteeringArtifactError) as info:
        SteeringVector.load(path)
    message = user_error_message(info.value)
    assert expected in message and "\n" not in message and str(path) in message


def test_steering_artifact_carries_format_version_and_checks_vocabulary(tmp_path):
    path = _artifact(tmp_path)
    assert json.loads((path / "steering_vector.json").read_text())["format_version"] == FORMAT_VERSION
    vector = SteeringVector.load(path)
    with pytest.raises(SteeringArtifactError, match=r"field 'vocab_size': 17, but the model has 18 logits"):
        vector.check_compatible(18, "abc", source=str(path / "steering_vector.json"))
    with pytest.raises(SteeringArtifactError, match=r"field 'tokenizer_fingerprint': abc, but the model's tokenizer"):
        vector.check_compatible(17, "xyz", source=str(path / "steering_vector.json"))
    _edit_meta(path, format_version=None)  # a legacy artifact without the field is read as version 1
    meta = json.loads((path / "steering_vector.json").read_text())
    del meta["format_version"]
    (path / "steering_vector.json").write_text(json.dumps(meta))
    assert torch.equal(SteeringVector.load(path).direction, vector.direction)


# -- atomic writes ----------------------------------------------------------------------------


def test_atomic_directory_keeps_the_previous_artifact_on_failure(tmp_path):
    first = _artifact(tmp_path)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(RuntimeError), atomic_directory(first) as tmp:
        (tmp / "steering_vector.json").write_text("{half")
        raise RuntimeError("killed mid-write")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    second = SteeringVector(torch.ones(17), 2.0, metadata={"vocab_size": 17}).save(first)
    assert SteeringVector.load(second).mu == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steering"]  # no temporary left behind
    atomic_write_text(tmp_path / "results.json", "{}\n")
    assert (tmp_path / "results.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "steering"]


def test_killed_save_leaves_the_previous_or_the_new_artifact(tmp_path):
    """SIGKILL a process that rewrites the artifact in a loop, at three moments: what is left
    always loads, and its metadata and tensor belong to the same save."""
    path = _artifact(tmp_path, vocab=200_000)
    code = (
        "import sys, torch\nfrom svdecode_pl.steering.vector import SteeringVector\n"
        "print('ready', flush=True)\ni = 0\nwhile True:\n    i += 1\n"
        "    vector = SteeringVector(torch.full((200000,), float(i)), float(i), metadata={'vocab_size': 200000})\n"
        "    vector.save(sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for delay in (0.05, 0.13, 0.31):
        writer = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.kill()
        writer.wait()
        vector = SteeringVector.load(path)
        assert vector.mu == -1.5 or bool((vector.direction == vector.mu).all())
        assert [p.name for p in tmp_path.iterdir() if p.name != "steering"] in ([], [p.name for p in tmp_path.iterdir()
                                                                                   if p.name.endswith(".tmp")])


# -- adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model = get_peft_model(load_causal_lm("svdecode-tiny"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(path))
    return path


def test_adapter_checks(tmp_path, tiny_adapter):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        check_adapter(tmp_path / "nope", "svdecode-tiny")
    (tmp_path / "plain").mkdir()
    with pytest.raises(AdapterError, match=r"not a PEFT adapter \(no adapter_config.json"):
        check_adapter(tmp_path / "plain", "svdecode-tiny")
    assert check_adapter(tiny_adapter, "svdecode-tiny")["peft_type"] == "LORA"
    with pytest.warns(UserWarning, match=r"trained on '.*svdecode-tiny-.*', it is loaded onto .*'svdecode-tiny-llama'"):
        check_adapter(tiny_adapter, "svdecode-tiny-llama")
    with pytest.warns(UserWarning), pytest.raises(AdapterError, match=r"does not fit --model.name_or_path "
                                                                      r"'svdecode-tiny-256': size mismatch"):
        load_checked_adapter(load_causal_lm("svdecode-tiny-256"), tiny_adapter, "svdecode-tiny-256")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapter, broken)
    _truncate(broken / "adapter_model.safetensors", 100)
    with pytest.raises(AdapterError, match=r"broken: adapter weights truncated or corrupt"):
        load_checked_adapter(load_causal_lm("svdecode-tiny"), broken, "svdecode-tiny")
    assert isinstance(load_checked_adapter(load_causal_lm("svdecode-tiny"), tiny_adapter, "svdecode-tiny"),
                      PeftModel)


# -- the console script -----------------------------------------------------------------------


def _svdecode() -> str:
    local = Path(sys.executable).parent / "svdecode"
    return str(local) if local.exists() else "svdecode"


def _bad_inputs(root: Path, adapter: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra arguments of ``svdecode test``, what the one line must contain)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.json").write_text("")
    rows = mc_records(4)
    del rows[2]["mc1_targets"]
    (root / "missing_field.json").write_text(json.dumps(rows))
    (root / "bad_utf8.csv").write_bytes(b"Question,Best Answer,Correct Answers,Incorrect Answers\n\xff\xfe,a,b,c\n")
    vocab = output_vocab_size(load_causal_lm("svdecode-tiny"))
    steering_runs = {}
    for case in ("corrupt safetensors", "newer format", "nan"):
        run = root / case.replace(" ", "_")
        direction = torch.randn(vocab)
        if case == "nan":
            direction[:3] = float("nan")
        path = SteeringVector(direction, 1.0, metadata={"vocab_size": vocab}).save(run / "steering")
        if case != "nan":
            STEERING_CASES[case][0](path)
        steering_runs[case] = run
    wrong_vocab = root / "wrong_vocab"
    SteeringVector(torch.randn(99), 1.0, metadata={"vocab_size": 99}).save(wrong_vocab / "steering")
    (root / "not_an_adapter").mkdir()
    tiny = ["--data.synthetic_questions", "4"]
    return {
        "empty data file": (["--data.path", str(root / "empty.json")], f"{root / 'empty.json'}: file is empty"),
        "missing field": (["--data.path", str(root / "missing_field.json")],
                          f"{root / 'missing_field.json'}: record 2: field 'mc1_targets': missing"),
        "invalid utf-8": (["--data.path", str(root / "bad_utf8.csv")], f"{root / 'bad_utf8.csv'}: not valid UTF-8"),
        "missing data file": (["--data.path", str(root / "nope.json")], f"{root / 'nope.json'}: no such file"),
        "steering corrupt safetensors": (
            [*tiny, "--trainer.default_root_dir", str(steering_runs["corrupt safetensors"])],
            f"{steering_runs['corrupt safetensors'] / 'steering' / 'steering_vector.safetensors'}: truncated or "
            "corrupt"),
        "steering newer format": (
            [*tiny, "--trainer.default_root_dir", str(steering_runs["newer format"])],
            f"{steering_runs['newer format'] / 'steering' / 'steering_vector.json'}: field 'format_version': "
            f"{FORMAT_VERSION + 1}: written by a newer svdecode"),
        "steering nan": ([*tiny, "--trainer.default_root_dir", str(steering_runs["nan"])],
                         f"{steering_runs['nan'] / 'steering' / 'steering_vector.safetensors'}: tensor 'direction': "
                         "3 NaN or infinite entries"),
        "steering vocabulary": ([*tiny, "--trainer.default_root_dir", str(wrong_vocab)],
                                f"steering_vector.json: field 'vocab_size': 99, but the model has {vocab} logits"),
        "adapter missing": ([*tiny, "--model.adapter_path", str(root / "no_adapter")],
                            f"{root / 'no_adapter'}: adapter directory not found"),
        "not an adapter": ([*tiny, "--model.adapter_path", str(root / "not_an_adapter")],
                           f"{root / 'not_an_adapter'}: not a PEFT adapter"),
        "adapter shapes": ([*tiny, "--model.name_or_path", "svdecode-tiny-256", "--model.adapter_path", str(adapter)],
                           f"{adapter}: adapter of "),
        "model path": ([*tiny, "--model.name_or_path", str(root / "no_model")],
                       f"{root / 'no_model'}: cannot load the tokenizer: no such directory"),
        "option value": ([*tiny, "--data.train_fraction", "0.7", "--data.val_fraction", "0.5"],
                         "--data.train_fraction 0.7, --data.val_fraction 0.5: need"),
        **_option_path_and_combination_inputs(root),
        **_run_and_value_inputs(root, adapter, vocab),
    }


def _run_and_value_inputs(root: Path, adapter: Path, vocab: int) -> dict[str, tuple[list[str], str]]:
    """Issue 29's mistakes: values that are not finite or out of range, a config key given twice, a run
    directory that holds another run or is being written, checkpoints of another kind or model, the
    vector of another adapter, an empty split. A leading ``fit`` runs that subcommand."""
    from svdecode_pl.steering.provenance import RunProvenance
    from svdecode_pl.utils.run_lock import LOCK_FILE

    configs = root / "configs"  # a folder of their own: beside nope.yaml they would be its "did you mean"
    configs.mkdir()
    (configs / "nan_mu.yaml").write_text("steering:\n  strength: .nan\n")
    (configs / "twice.yaml").write_text("model:\n  adapter_path: x\ntrainer:\n  max_steps: 2\n"
                                        "model:\n  dtype: float32\n")
    (root / "finished" / "adapter").mkdir(parents=True)
    (root / "finished" / "adapter" / "adapter_config.json").write_text("{}")
    (root / "cut" / "checkpoints").mkdir(parents=True)
    (root / "cut" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (root / "locked").mkdir()
    (root / "locked" / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                         "command": "fit", "started": "now"}))
    other = root / "other_run" / "adapter"
    shutil.copytree(adapter, other)
    (other / "adapter_model.safetensors").write_bytes(b"another adapter")
    torch.save({"state_dict": {}, "svdecode_run": {"name_or_path": "svdecode-tiny-256", "peft": "LoraConfig"}},
               root / "other_model.ckpt")
    foreign = RunProvenance("0" * 64, "runs/x/adapter", "svdecode-tiny", "truthfulqa_mc", 0).as_dict()
    SteeringVector(torch.randn(vocab), 1.0, metadata={"vocab_size": vocab, "provenance": foreign}).save(
        root / "foreign_vector" / "steering")
    tiny = ["--data.synthetic_questions", "4"]
    return {
        # values (before any model loads)
        "strength nan in a config file": (["--config", str(configs / "nan_mu.yaml")],
                                    "--steering.strength nan: expected a finite number, not NaN"),
        "strength 1e400": (["--steering.strength", "1e400"],
                           "--steering.strength inf: expected a finite number, not infinity"),
        "confidence threshold 1.5": (["fit", "--steering.confidence_threshold", "1.5"],
                                     "--steering.confidence_threshold 1.5: expected a finite number in [0, 1)"),
        "negative minimum gain": (["fit", "--steering.min_gain", "-0.01"],
                                  "--steering.min_gain -0.01: expected a finite number in [0, 1)"),
        "config key twice": (["--config", str(configs / "twice.yaml")], "key 'model' given twice (line 1 and line 5)"),
        "zero batch size": (["fit", "--data.batch_size", "0"], "--data.batch_size 0: expected an integer >= 1"),
        "unsupported peft method": (["fit", "--model.peft", "peft.LoHaConfig"],
                                    "--model.peft peft.LoHaConfig: PEFT method 'LOHA' is not supported"),
        # run directories and checkpoints (before any model loads)
        "fit into a finished run": (["fit", "--trainer.default_root_dir", str(root / "finished")],
                                    f"--trainer.default_root_dir {root / 'finished'}: holds a finished run"),
        "fit into an interrupted run": (["fit", "--trainer.default_root_dir", str(root / "cut")],
                                        f"holds an interrupted fit ({root / 'cut' / 'checkpoints' / 'last.ckpt'})"),
        "run directory being written": (["--trainer.default_root_dir", str(root / "locked")],
                                        f"svdecode fit (pid {os.getpid()} on"),
        "results into another run": (["--model.adapter_path", str(adapter), "--trainer.default_root_dir",
                                      str(root / "other_run")],
                                     f"--trainer.default_root_dir {root / 'other_run'}: holds another run"),
        "checkpoint of another kind": (["fit", "--ckpt_path", str(adapter / "adapter_model.safetensors")],
                                       "a safetensors file (adapter or model weights, not a Lightning checkpoint)"),
        "checkpoint of another model": (["fit", "--ckpt_path", str(root / "other_model.ckpt")],
                                        "a checkpoint of model 'svdecode-tiny-256', not --model.name_or_path"),
        # after the model loads
        "vector of another adapter": ([*tiny, "--model.name_or_path", "svdecode-tiny", "--model.adapter_path",
                                       str(adapter), "--trainer.default_root_dir", str(root / "foreign_vector")],
                                      "field 'provenance.adapter_sha256': fitted with the adapter runs/x/adapter"),
        "empty test split": ([*tiny, "--data.train_fraction", "1.0", "--data.val_fraction", "0"],
                             "split 'test' is empty (train 4, validation 0, test 0 examples)"),
    }


#: name -> the hint line it must print (cases without one print none)
HINTS = {"misspelt option": "svdecode: hint: did you mean --model.learning_rate",
         "misspelt data option": "svdecode: hint: did you mean --data.path",
         "value outside a choice": "svdecode: hint: did you mean float32"}


def _option_path_and_combination_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    """Option mistakes (which the parser would bury under 70 lines of usage), paths that cannot be
    used (checked before any work starts) and combinations that cannot run (refused before the
    model loads), each as one line naming the option or file."""
    (root / "a_file").write_text("not a directory\n")
    (root / "bad.yaml").write_text("trainer: [max_steps: 1\n")
    (root / "dir.yaml").mkdir()
    generation = str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml")
    return {
        # options
        "misspelt option": (["--model.learnig_rate", "0.1"], "--model.learnig_rate: no such option"),
        "misspelt data option": (["--data.pth", "x.json"], "--data.pth: no such option of TruthfulQADataModule"),
        "missing config file": (["--config", str(root / "nope.yaml")], f"--config {root / 'nope.yaml'}: no such file"),
        "config not yaml": (["--config", str(root / "bad.yaml")], f"--config {root / 'bad.yaml'}: not valid YAML"),
        "config a directory": (["--config", str(root / "dir.yaml")], "dir.yaml: is a directory"),
        "value outside a choice": (["--model.dtype", "float8"],
                                   "--model.dtype float8: not one of auto, float32, bfloat16, float16"),
        "steering mode": (["--steering.mode", "sideways"], "--steering.mode sideways: not one of static, dynamic"),
        "steering strength": (["--steering.strength", "validaton"],
                              "--steering.strength validaton: not one of validation, mu_star, mu_star_heldout, "
                              "mu_star_filtered, or a float"),
        "not a number": (["--trainer.max_steps", "many"], "--trainer.max_steps many: expected int"),
        # paths
        "run directory is a file": (["--trainer.default_root_dir", str(root / "a_file")],
                                    f"--trainer.default_root_dir {root / 'a_file'}: is a file, not a directory"),
        "run directory under a file": (["--trainer.default_root_dir", str(root / "a_file" / "run")],
                                       f"cannot create it: {root / 'a_file'} is a file"),
        "steering directory is a file": (["--steering.dirpath", str(root / "a_file")],
                                         f"--steering.dirpath {root / 'a_file'}: is a file"),
        "adapter is a file": (["--model.adapter_path", str(root / "a_file")],
                              f"--model.adapter_path {root / 'a_file'}: is a file, not an adapter directory"),
        "checkpoint missing": (["--ckpt_path", str(root / "nope.ckpt")], f"--ckpt_path {root / 'nope.ckpt'}: no such"),
        # combinations
        # (dynamic steering with beam search was one; it runs now: tests/test_dynamic_beams.py)
        "sampling at temperature 0": (
            ["--config", generation, "--data.generation.do_sample", "true", "--data.generation.temperature", "0"],
            "--data.generation.do_sample true cannot run with --data.generation.temperature 0"),
        "a scale on the validation choice": (["--steering.mu_scale", "2"],
                                             "--steering.mu_scale 2.0 cannot run with --steering.strength validation"),
    }


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory, tiny_adapter) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every bad input through the real console script, three processes at a time."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cases = _bad_inputs(root, tiny_adapter)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SVDECODE_DEBUG"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    pending = list(cases.items()) + [("debug", (["--debug", "--data.path", str(root / "empty.json")], "Traceback"))]
    running, done = {}, {}
    while pending or running:
        while pending and len(running) < 3:
            name, (args, expected) = pending.pop(0)
            subcommand, args = (args[0], args[1:]) if args[:1] == ["fit"] else ("test", args)
            # a run directory each: one command at a time writes a run directory (its lock)
            run_dir = root / "runs" / name.replace(" ", "_")
            command = [_svdecode(), subcommand, "--config", QUICKSTART, "--trainer.enable_progress_bar", "false",
                       "--trainer.logger", "false", "--trainer.default_root_dir", str(run_dir), *args]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       cwd=root)
            running[name] = (process, expected, time.time())
        for name, (process, expected, started) in list(running.items()):
            if process.poll() is not None or time.time() - started > 300:
                if process.returncode is None:
                    process.kill()
                out, err = process.communicate()
                done[name] = (subprocess.CompletedProcess(process.args, process.returncode, out, err), expected)
                del running[name]
        time.sleep(0.2)
    return done


CONSOLE_CASES = [
    "empty data file", "missing field", "invalid utf-8", "missing data file", "steering corrupt safetensors",
    "steering newer format", "steering nan", "steering vocabulary", "adapter missing", "not an adapter",
    "adapter shapes", "model path", "option value", "vector of another adapter", "empty test split",
]
#: caught before any model loads: nothing else on stderr, one line (two with a hint)
EARLY_CASES = [
    "misspelt option", "misspelt data option", "missing config file", "config not yaml", "config a directory",
    "value outside a choice", "steering mode", "not a number", "run directory is a file",
    "run directory under a file", "steering directory is a file", "adapter is a file", "checkpoint missing",
    "sampling at temperature 0", "strength nan in a config file", "strength 1e400", "confidence threshold 1.5",
    "negative minimum gain",
    "config key twice",
    "zero batch size", "unsupported peft method", "fit into a finished run", "fit into an interrupted run",
    "run directory being written", "results into another run", "checkpoint of another kind",
    "checkpoint of another model",
]


def assert_exit_2_without_traceback(result) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", CONSOLE_CASES)
def test_console_script_reports_one_line(console_runs, case):
    result, expected = console_runs[case]
    assert_exit_2_without_traceback(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("svdecode: error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert expected in errors[0], errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", EARLY_CASES)
def test_console_script_refuses_options_paths_and_combinations_early(console_runs, case):
    result, expected = console_runs[case]
    assert_exit_2_without_traceback(result)
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr[-3000:]
    assert lines[0].startswith("svdecode: error: ") and expected in lines[0], lines[0]
    if case in HINTS:
        assert len(lines) == 2 and lines[1].startswith(HINTS[case]), lines
    else:
        assert len(lines) == 1, lines


@pytest.mark.slow
def test_console_script_debug_shows_the_traceback(console_runs):
    result, _ = console_runs["debug"]
    assert result.returncode != 0 and "Traceback" in result.stderr and "file is empty" in result.stderr


def test_help_states_debug(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_user_input_error_is_the_common_base():
    assert issubclass(DataFormatError, UserInputError) and issubclass(DataFormatError, ValueError)
    assert issubclass(SteeringArtifactError, UserInputError) and issubclass(AdapterError, UserInputError)


@pytest.mark.parametrize(("args", "first", "hint"), [
    (["--model.learnig_rate", "0.1"], "--model.learnig_rate: no such option", "did you mean --model.learning_rate"),
    (["--model.dtype", "float8"], "--model.dtype float8: not one of auto, float32, bfloat16, float16",
     "did you mean float32"),
    (["--trainer.default_root_dir", "README.md"], "--trainer.default_root_dir README.md: is a file", None),
    (["--data.world", "moon"],
     "--data.world 'moon': no such world (expected one of superstitions, gadgets, garden, kitchen, sports, "
     "school)", None),
    (["--config", str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"), "--data.generation.do_sample", "true",
      "--data.generation.temperature", "0"],
     "--data.generation.do_sample true cannot run with --data.generation.temperature 0", None),
])
def test_option_path_and_combination_mistakes_in_process(monkeypatch, capsys, args, first, hint):
    """The same refusals as the console script's, in-process: the parser raises instead of
    printing its usage, and paths and combinations are checked before any class is built (a model
    loaded here would fail the test)."""
    from svdecode_pl.cli.lightning import SVDecodeCLI

    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(SVDecodeCLI, "instantiate_classes", lambda self: pytest.fail("classes were built"))
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", QUICKSTART, "--trainer.logger", "false", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"svdecode: error: {lines[0][len('svdecode: error: '):]}" and first in lines[0], lines
    assert lines[1:] == ([] if hint is None else lines[1:2]) and len(lines) == (1 if hint is None else 2), lines
    if hint is not None:
        assert lines[1].startswith(f"svdecode: hint: {hint}")
