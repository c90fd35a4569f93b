"""Every value checked where it enters, with one rule set (issue 29, class 2): NaN, infinity and
out-of-range values are refused at the steering options, the module and data options, the
SteeringVector API and its loader, ``load_steered``, lm-eval's model args and ``svdecode logit-bias``,
before any work starts; config files refuse a key given twice; JSON outputs are always valid."""

from __future__ import annotations

import json
import math

import pytest
import torch

from svdecode_pl.cli.checks import check_config_files, load_yaml_strictly
from svdecode_pl.cli.entry import main
from svdecode_pl.recipes.callbacks.steering import SteeringVectorCallback
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule
from svdecode_pl.utils.errors import CommandLineError, OptionError, SteeringArtifactError, user_error_message
from svdecode_pl.utils.files import json_text
from svdecode_pl.utils.validation import FINITE, FRACTION, POSITIVE_INT, check_value

NAN, INF = float("nan"), float("inf")


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity (as jq and JavaScript do)."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("rule", "value", "problem"), [
    (FINITE, NAN, "expected a finite number, not NaN"), (FINITE, INF, "expected a finite number, not infinity"),
    (FINITE, float("1e400"), "not infinity"), (FINITE, "big", "expected a finite number"),
    (FINITE, True, "expected a finite number"), (FRACTION, 1.5, "expected a finite number in [0, 1)"),
    (FRACTION, 1.0, "in [0, 1)"), (FRACTION, -0.1, "in [0, 1)"), (POSITIVE_INT, 0, "an integer >= 1"),
    (POSITIVE_INT, 2.0, "an integer >= 1"),
])
def test_rules_refuse_in_one_line(rule, value, problem):
    with pytest.raises(OptionError) as info:
        check_value("--x", value, rule)
    message = user_error_message(info.value)
    assert message.startswith("--x ") and problem in message and "\n" not in message
    assert check_value("--x", 0.5, FRACTION) == 0.5 and check_value("--x", 3, POSITIVE_INT) == 3


@pytest.mark.parametrize(("options", "expected"), [
    ({"strength": NAN}, "--steering.strength nan: expected a finite number, not NaN"),
    ({"strength": INF}, "--steering.strength inf: expected a finite number, not infinity"),
    ({"mu_scale": NAN}, "--steering.mu_scale nan"),
    ({"confidence_threshold": 1.5}, "--steering.confidence_threshold 1.5: expected a finite number in [0, 1)"),
    ({"filter_threshold": -0.1}, "--steering.filter_threshold -0.1"),
    ({"eps": -1.0}, "--steering.eps -1.0: expected a finite number >= 0"),
    ({"mu_grid": [1.0, NAN]}, "--steering.mu_grid[1] nan"),
])
def test_steering_options_are_checked_at_construction(options, expected):
    """The callback is built from the CLI and the config file before any model loads: a value that
    would make every score NaN (and rank a NaN row's first answer highest) never reaches a run."""
    with pytest.raises(OptionError) as info:
        SteeringVectorCallback(**options)
    assert user_error_message(info.value).startswith(expected)


@pytest.mark.parametrize(("cls", "options", "expected"), [
    (SVDecodeModule, {"learning_rate": NAN}, "--model.learning_rate nan"),
    (SVDecodeModule, {"learning_rate": 0.0}, "--model.learning_rate 0.0: expected a finite number > 0"),
    (SVDecodeModule, {"chunk_tokens": 0}, "--model.chunk_tokens 0: expected an integer >= 1"),
    (SVDecodeModule, {"score_batch_tokens": -1}, "--model.score_batch_tokens -1"),
    (TruthfulQADataModule, {"batch_size": 0}, "--data.batch_size 0: expected an integer >= 1"),
    (TruthfulQADataModule, {"eval_batch_size": 0}, "--data.eval_batch_size 0"),
    (TruthfulQADataModule, {"limit": 0}, "--data.limit 0"),
    (TruthfulQADataModule, {"train_fraction": NAN}, "--data.train_fraction nan"),
    (TruthfulQAGenerationDataModule, {"synthetic_questions": -3}, "--data.synthetic_questions -3"),
])
def test_module_and_data_options_are_checked_at_construction(cls, options, expected):
    with pytest.raises(OptionError) as info:
        cls(**options)
    assert user_error_message(info.value).startswith(expected)


def test_unsupported_peft_method_is_refused():
    """LoHa ran without its adapter being seeded, sharded or checked like the four supported methods."""
    from peft import LoHaConfig, LoraConfig

    from svdecode_pl.utils.errors import AdapterError

    SVDecodeModule(peft=LoraConfig())
    with pytest.raises(AdapterError) as info:
        SVDecodeModule(peft=LoHaConfig())
    assert user_error_message(info.value).startswith(
        "--model.peft peft.LoHaConfig: PEFT method 'LOHA' is not supported (supported: peft.LoraConfig, peft.IA3Config")


def test_fractions_that_add_up_to_one_are_not_refused_by_rounding():
    """0.2 <= 1 - 0.8 is False in floats (1 - 0.8 = 0.19999999999999996)."""
    TruthfulQADataModule(train_fraction=0.8, val_fraction=0.2)
    with pytest.raises(OptionError, match="need 0 <= train_fraction"):
        TruthfulQADataModule(train_fraction=0.8, val_fraction=0.3)


def test_steering_vector_refuses_what_its_loader_would(tmp_path):
    """``save()`` wrote a NaN strength that ``load()`` then refused; now neither is possible, and
    both apply the same rule to the confidence threshold."""
    with pytest.raises(OptionError, match="SteeringVector: mu nan"):
        SteeringVector(torch.ones(4), NAN)
    with pytest.raises(OptionError, match="SteeringVector: confidence_threshold 1.0"):
        SteeringVector(torch.ones(4), 1.0, confidence_threshold=1.0)
    vector = SteeringVector(torch.ones(4), 1.0)
    with pytest.raises(OptionError):
        vector.with_mu(INF)
    path = vector.save(tmp_path / "v")
    meta = json.loads((path / "steering_vector.json").read_text())
    meta["confidence_threshold"] = 1.0
    (path / "steering_vector.json").write_text(json.dumps(meta))
    with pytest.raises(SteeringArtifactError, match=r"'confidence_threshold': expected a finite number in \[0, 1\)"):
        SteeringVector.load(path)


def test_load_steered_refuses_nan_before_loading_anything(tmp_path):
    from svdecode_pl.integrations.artifact import load_steered

    with pytest.raises(OptionError, match="load_steered: mu nan"):
        load_steered(tmp_path / "no_such_artifact", mu=NAN)  # refused before the (missing) model is touched


@pytest.mark.parametrize(("args", "expected"), [
    (["--mu", "nan"], "--mu nan: expected a finite number (or null), not NaN"),
    (["--mu", "1e400"], "--mu inf"),
    (["--clamp", "-5"], "--clamp -5.0: expected a finite number > 0"),
    (["--clamp", "0"], "--clamp 0.0"),
    (["--max-entries", "0"], "--max-entries 0: expected an integer >= 1"),
])
def test_logit_bias_command_refuses_bad_numbers(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.delenv("SVDECODE_DEBUG", raising=False)
    path = SteeringVector(torch.randn(50), 2.0).save(tmp_path / "steering")
    with pytest.raises(SystemExit) as info:
        main(["logit-bias", str(path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("svdecode: error: ") and expected in err[0], err


def test_logit_bias_output_is_valid_json(tmp_path, capsys):
    path = SteeringVector(torch.randn(50), 2.0).save(tmp_path / "steering")
    main(["logit-bias", str(path), "--max-entries", "10"])
    out = capsys.readouterr().out
    assert len(strict_loads(out)["logit_bias"]) == 10


def test_json_outputs_hold_no_nan(tmp_path):
    from svdecode_pl.evaluation.items import Record
    from svdecode_pl.results.payload import write_results

    payload = {"metrics": {"mc1": {"plain": NAN, "steered": INF}}, "curve": [1.0, -INF]}
    parsed = strict_loads(write_results(tmp_path / "results.json", payload).read_text())
    assert parsed == {"metrics": {"mc1": {"plain": None, "steered": None}}, "curve": [1.0, None]}
    record = Record(uid=0, id="q", metrics={"plain": {"mc1": NAN}, "steered": None})
    assert strict_loads(record.to_json())["metrics"]["plain"]["mc1"] is None
    assert strict_loads(json_text({"x": [math.nan]})) == {"x": [None]}


def test_config_key_given_twice_is_one_line(tmp_path):
    """YAML keeps the last of two equal keys without a word: a second ``model:`` block dropped the
    first (the run then had no adapter)."""
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  adapter_path: runs/x/adapter\ntrainer:\n  max_steps: 2\n"
                      "model:\n  learning_rate: 0.1\n")
    with pytest.raises(CommandLineError) as info:
        check_config_files(["test", "--config", str(config)])
    assert user_error_message(info.value) == (
        f"--config {config}: key 'model' given twice (line 1 and line 5); the second would replace the first: "
        "merge them into one")
    nested = "trainer:\n  max_steps: 2\n  max_steps: 3\n"
    with pytest.raises(CommandLineError, match="key 'max_steps' given twice"):
        load_yaml_strictly(nested, "x.yaml")
    assert load_yaml_strictly("a: 1\nb: {c: 2}\n", "x.yaml") == {"a": 1, "b": {"c": 2}}
