"""Every shipped config parses and instantiates (models load lazily, so hub ids cost nothing); the
paper grid composes from its pieces; ablations are deltas of the ``steering:`` key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import real_data
from lightning.pytorch.callbacks import ModelCheckpoint

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.cli.lightning import SVDecodeCLI
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.tasks.base import TaskDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
       "--trainer.devices", "1"]
MODELS = sorted((CONFIGS / "model").glob("*.yaml"))
METHODS = [CONFIGS / "peft" / f"{name}.yaml" for name in ("lora", "ia3", "prompt_tuning", "p_tuning_v2")]
TASKS = sorted((CONFIGS / "data").glob("*.yaml"))
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))


def build(*configs: Path, extra: tuple[str, ...] = ()) -> SVDecodeCLI:
    args = [a for c in configs for a in ("--config", str(c))]
    return SVDecodeCLI(SVDecodeModule, TaskDataModule, subclass_mode_data=True, run=False, args=[*args, *CPU, *extra])


def steering_callbacks(cli: SVDecodeCLI) -> list[SteeringVectorCallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, SteeringVectorCallback)]


def paper(model: Path, method: Path, task: Path) -> tuple[Path, ...]:
    return CONFIGS / "paper" / "trainer.yaml", model, method, task


@pytest.mark.parametrize("model, method, task", list(itertools.product(MODELS, METHODS, TASKS)),
                         ids=lambda p: p.stem)
def test_paper_grid_composes(model, method, task):
    cli = build(*paper(model, method, task))
    assert cli.model.hparams.name_or_path.split("/")[0] in ("Qwen", "meta-llama")
    assert cli.model.hparams.dtype == "bfloat16"
    assert cli.model.peft_config is not None and cli.model.peft_config.task_type == "CAUSAL_LM"
    (steering,) = steering_callbacks(cli)
    assert steering.mode == "static" and steering.strength == "mu_star" and steering.mu_grid  # the paper's method
    assert type(cli.datamodule).__name__.endswith("DataModule")


def test_one_setting_per_method():
    """The quickstart's and the paper grid's LoRA come from one file each; the grid's is peft/lora.yaml."""
    for method in METHODS:
        cli = build(*paper(MODELS[0], method, TASKS[0]))
        alone = build(CONFIGS / "quickstart.yaml", method)
        assert cli.model.peft_config == alone.model.peft_config
        assert cli.model.hparams.learning_rate == alone.model.hparams.learning_rate


@pytest.mark.parametrize("base", ["quickstart", "paper"])
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_fragments_keep_the_base_callbacks(base, path):
    configs = (CONFIGS / "quickstart.yaml",) if base == "quickstart" else paper(MODELS[1], METHODS[0], TASKS[1])
    before, after = build(*configs), build(*configs, path)
    checkpoints = lambda cli: [(type(c).__name__, c.save_last, c._every_n_train_steps)  # noqa: E731
                               for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoints(after) == checkpoints(before) and checkpoints(before)
    (callback,) = steering_callbacks(after)
    stem = path.stem
    changed = {key for key in ("enabled", "mode", "confidence_threshold", "strength", "mu_scale", "calibration")
               if getattr(callback, key) != getattr(steering_callbacks(before)[0], key)}
    # the quickstart chooses on validation, the paper steers at mu*: a scale ablation names mu* itself
    scaled = {"mu_scale", "strength"} if base == "quickstart" else {"mu_scale"}
    expected = {"dynamic": {"mode"}, "mu_fixed_1": {"strength"}, "mu_fixed_minus_1": {"strength"},
                "mu_scale_0.5": scaled, "mu_scale_2": scaled, "no_steering": {"enabled"},
                "heldout_calibration": {"calibration"}}
    assert changed == expected.get(stem, {"confidence_threshold"})
    if stem.startswith("mu_fixed"):
        assert callback.strength == (1.0 if stem == "mu_fixed_1" else -1.0)
    if stem.startswith("confidence_"):
        assert callback.confidence_threshold == float(stem.split("_")[1])
    if stem == "heldout_calibration":
        assert after.datamodule.hparams.val_fraction == 0.1
        assert after.datamodule.hparams.seed == before.datamodule.hparams.seed  # the base config's data is kept


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt_tuning", "p_tuning_v2", "none"])
def test_peft_fragments(name):
    cli = build(CONFIGS / "quickstart.yaml", CONFIGS / "peft" / f"{name}.yaml")
    expected = {"lora": "LoraConfig", "ia3": "IA3Config", "prompt_tuning": "PromptTuningConfig",
                "p_tuning_v2": "PrefixTuningConfig", "none": "NoneType"}[name]
    assert type(cli.model.peft_config).__name__ == expected


@pytest.mark.parametrize("path", sorted(ROOT.joinpath("callbacks").glob("*.yaml")), ids=lambda p: p.stem)
def test_callback_sets_compose(path):
    # the quickstart checkpoints already; the judge recipe does not (Lightning then adds its default)
    base = CONFIGS / ("judges/train_truth_judge.yaml" if path.stem == "checkpointing" else "quickstart.yaml")
    if path.stem == "checkpointing":  # the judge recipe reads the authors' judge data when built
        real_data("truthfulqa", "judge", "finetune_truth.jsonl")
    before, after = build(base), build(base, path)
    added = {"checkpointing": "RunCheckpoint", "early_stopping": "EarlyStopping",
             "prediction_writer": "JSONLPredictionWriter"}[path.stem]
    names = lambda cli: [type(c).__name__ for c in cli.trainer.callbacks]  # noqa: E731
    assert added in names(after) and added not in names(before)
    kept = [n for n in names(before) if n != "ModelCheckpoint"]
    assert [n for n in names(after) if n in kept] == kept
    assert len(steering_callbacks(after)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method, task", list(zip(METHODS, [*TASKS, TASKS[0]])), ids=lambda p: p.stem)
def test_paper_pieces_run_on_the_tiny_model(tmp_path, method, task):
    """Each PEFT method and each task piece of the grid runs (fit, steering, test) with the tiny
    model on the command line and small local data."""
    data = {
        "commonsense": ["--data.data_dir", str(real_data("commonsense")), "--data.train_file", "null",
                        "--data.datasets", "[boolq, ARC-Easy]", "--data.limit_train", "40", "--data.limit_test", "4",
                        "--data.val_size", "0", "--data.max_new_tokens", "4"],
        "truthfulqa_mc": ["--data.path", str(real_data("truthfulqa", "mc_task.json")), "--data.limit", "16"],
        "truthfulqa_gen": ["--data.path", str(real_data("truthfulqa", "TruthfulQA.csv")), "--data.limit", "8",
                           "--data.generation.max_new_tokens", "4"],
    }[task.stem]
    args = [a for c in paper(MODELS[0], method, task) for a in ("--config", str(c))]
    args += [*CPU, "--model.name_or_path", "svdecode-tiny", "--model.dtype", "float32", "--trainer.max_steps", "2",
             "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
             "--trainer.accumulate_grad_batches", "1", "--trainer.enable_progress_bar", "false",
             "--steering.mu_grid", "[0.0, 1.0]", *data]
    run_cli(["fit", *args])
    run_cli(["test", *args, "--model.adapter_path", str(tmp_path / "adapter")])
    assert (tmp_path / "results.json").exists()
