"""Every shipped config parses and instantiates (models load lazily, so hub ids cost nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svdecode_pl.callbacks import SteeringVectorCallback
from svdecode_pl.cli import SVDecodeCLI
from svdecode_pl.module import SVDecodeModule

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false"]


def build(*configs: Path, extra: tuple[str, ...] = ()) -> SVDecodeCLI:
    from lightning.pytorch import LightningDataModule

    args = [a for c in configs for a in ("--config", str(c))]
    return SVDecodeCLI(SVDecodeModule, LightningDataModule, subclass_mode_data=True, run=False,
                       args=[*args, *CPU, *extra])


def steering_callback(cli: SVDecodeCLI) -> SteeringVectorCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, SteeringVectorCallback))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_grid_configs(path):
    cli = build(path, extra=("--trainer.devices", "1"))
    assert cli.model.hparams.name_or_path.split("/")[0] in ("Qwen", "meta-llama")
    assert cli.model.peft_config is not None and cli.model.peft_config.task_type == "CAUSAL_LM"
    assert steering_callback(cli).mode == "static"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_ablation_fragments_compose_with_quickstart(path):
    cli = build(ROOT / "configs" / "quickstart.yaml", path)
    callback = steering_callback(cli)
    stem = path.stem
    if stem == "dynamic":
        assert callback.mode == "dynamic"
    if stem.startswith("confidence_"):
        assert callback.confidence_threshold == float(stem.split("_")[1])
    if stem == "mu_fixed_minus_1":
        assert callback.mu == -1.0
    if stem == "heldout_calibration":
        assert callback.calibration == "validation" and cli.datamodule.hparams.val_fraction == 0.1
        assert cli.datamodule.hparams.synthetic_questions == 400  # the base config's data is kept


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt_tuning", "prefix_tuning", "none"])
def test_peft_fragments(name):
    cli = build(ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "peft" / f"{name}.yaml")
    expected = {"lora": "LoraConfig", "ia3": "IA3Config", "prompt_tuning": "PromptTuningConfig",
                "prefix_tuning": "PrefixTuningConfig", "none": "NoneType"}[name]
    assert type(cli.model.peft_config).__name__ == expected


def test_steering_callback_set_composes():
    cli = build(ROOT / "configs" / "peft" / "lora.yaml", ROOT / "callbacks" / "steering.yaml",
                extra=("--data", "svdecode_pl.data.TruthfulQADataModule"))
    assert steering_callback(cli).calibration == "train"
