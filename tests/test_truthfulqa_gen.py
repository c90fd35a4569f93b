"""TruthfulQA generation and prompt/completion tasks: data, lm-eval's references, the whole
pipeline through the CLI, a judge trained with this system on the authors' judge data, and
1 vs 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import real_data, small_run_args

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.corpus.primer import QA_PRIMER
from svdecode_pl.evaluation.judges import Judge
from svdecode_pl.metrics.text import TRUTHFULQA_GEN_KEYS
from svdecode_pl.tasks.completion import PromptCompletionDataModule
from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule, TruthfulQAGenerationItem
from svdecode_pl.utils.errors import DataFormatError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml")


def small(run_dir: Path, *extra: str) -> list[str]:
    return small_run_args(QUICKSTART, run_dir, 22, "--data.generation.max_new_tokens", "6", *extra)


def test_real_csv_items_follow_lm_eval():
    dm = TruthfulQAGenerationDataModule(path=str(real_data("truthfulqa", "TruthfulQA.csv")), train_fraction=0.0)
    questions = dm.split("test")
    assert len(questions) == 817 and len(dm.eval_groups()) > 30
    item = dm.eval_items()[0]
    assert isinstance(item, TruthfulQAGenerationItem) and item.uid == 0 and item.group == questions[0].category
    assert dm.tokenizer.decode(item.context_ids) == f"{QA_PRIMER}\n\nQ: {questions[0].question}"
    assert item.true_refs[-1] == "I have no comment." and all(r.endswith(".") for r in item.true_refs + item.false_refs)
    example = dm.lm_example(questions[0])
    assert dm.tokenizer.decode(example.input_ids[example.num_context :]) == f"\nA: {questions[0].best_answer}\n\n"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "Q?", "best_answer": "", "correct_answers": ["a"], "incorrect_answers": ["b"]},
         "record 0: field 'best_answer': missing or empty"),
        ({"question": "Q?", "best_answer": "a", "correct_answers": 3, "incorrect_answers": ["b"]},
         "record 0: field 'correct_answers': expected a list of strings"),
        ({"question": "Q?", "best_answer": "a", "correct_answers": ["a"], "incorrect_answers": [" "]},
         "record 0: field 'incorrect_answers': no answers"),
    ],
)
def test_bad_generation_records_name_the_field(tmp_path, row, message):
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match=message):
        TruthfulQAGenerationDataModule(path=str(path)).split("test")


def test_prompt_completion_records(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) for w in "abcdefghij"))
    dm = PromptCompletionDataModule(path=str(path), train_fraction=0.6, text_metrics=True)
    assert len(dm.split("train")) == 6 and len(dm.split("test")) == 4
    assert dm.metric_names == ["exact_match", "bleu", "rouge1", "rouge2", "rougeL"]
    example = dm.lm_example(dm.split("train")[0])
    completion = dm.split("train")[0].completion
    assert dm.tokenizer.decode(example.input_ids[example.num_context :]) == completion + dm.tokenizer.eos_token
    item = dm.eval_items()[0]
    assert item.grade(" " + item.target.strip())[1]["exact_match"] == 1.0
    assert item.grade("nothing like it")[1]["exact_match"] == 0.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "completion": 3}) + "\n")
    with pytest.raises(DataFormatError, match="bad.jsonl: record 0: field 'completion': expected a string, got int"):
        PromptCompletionDataModule(path=str(tmp_path / "bad.jsonl")).split("train")


@pytest.mark.slow
def test_judge_trained_here_scores_a_generation_run(tmp_path):
    """Warm-start a tiny judge on the authors' truth data (prompt/completion), then a TruthfulQA
    generation run judged by it: truth, info and truth*info land in results.json, consistent with
    the judges' probabilities in predictions.jsonl and with the judge run on its own."""
    judge_data = real_data("truthfulqa", "judge", "finetune_truth.jsonl")
    judge_dir = tmp_path / "judge"
    run_cli(["fit", "--config", str(ROOT / "configs" / "judges" / "train_truth_judge.yaml"),
             "--data.path", str(judge_data), "--data.limit", "200", "--trainer.max_steps", "8",
             "--trainer.default_root_dir", str(judge_dir), "--trainer.enable_progress_bar", "false"])
    run_cli(["test", "--config", str(ROOT / "configs" / "judges" / "train_truth_judge.yaml"),
             "--data.path", str(judge_data), "--data.limit", "200", "--model.adapter_path", str(judge_dir / "adapter"),
             "--trainer.default_root_dir", str(judge_dir), "--trainer.enable_progress_bar", "false"])
    judge_results = json.loads((judge_dir / "results.json").read_text())
    assert judge_results["task"] == "prompt_completion" and judge_results["n_examples"] == 20
    assert 0.0 <= judge_results["metrics"]["exact_match"]["plain"] <= 1.0

    run_dir = tmp_path / "gen"
    judges = ["--data.judges.truth_model", "svdecode-tiny", "--data.judges.truth_adapter", str(judge_dir / "adapter"),
              "--data.judges.info_model", "svdecode-tiny", "--data.judges.info_adapter", str(judge_dir / "adapter")]
    run_cli(["fit", *small(run_dir), "--trainer.max_steps", "4"])
    run_cli(["predict", *small(run_dir, *judges), "--model.adapter_path", str(run_dir / "adapter"),
             "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"])
    run_cli(["test", *small(run_dir, *judges), "--model.adapter_path", str(run_dir / "adapter")])
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["metrics"]) == [*TRUTHFULQA_GEN_KEYS, "truth", "info", "truth_info"]
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == results["n_examples"] == 11
    judge = Judge.load("svdecode-tiny", str(judge_dir / "adapter"))
    first = records[0]
    answer = first["generation"]["plain"].strip().removeprefix("A:").strip()
    assert first["judges"]["plain"]["truth"] == pytest.approx(
        float(judge.yes_probabilities([first["question"]], [answer])[0]), abs=1e-6)
    for variant in ("plain", "steered"):
        truth = [float(r["judges"][variant]["truth"] >= 0.5) for r in records]
        info = [float(r["judges"][variant]["info"] >= 0.5) for r in records]
        assert results["metrics"]["truth"][variant] == pytest.approx(sum(truth) / len(truth))
        assert results["metrics"]["truth_info"][variant] == pytest.approx(
            sum(t * i for t, i in zip(truth, info)) / len(truth))
    assert set(results["per_category"]) == {"Colors", "Superstitions"}


@pytest.mark.slow
def test_generation_same_on_one_and_two_processes(tmp_path):
    """11 test questions, 2 processes (one question on both): the same metrics and the same
    JSONL records, each once, in input order."""
    run_dir = tmp_path / "fit"
    run_cli(["fit", *small(run_dir), "--trainer.max_steps", "4"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    outputs = {}
    for name, devices in (("one", 1), ("two", 2)):
        out = tmp_path / name
        for sub in ("test", "predict"):
            args = [sys.executable, "-m", "svdecode_pl.cli", sub, *small(out), "--model.adapter_path",
                    str(run_dir / "adapter"), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
            if devices > 1:
                args += ["--trainer.strategy", "ddp"]
            if sub == "predict":
                args += ["--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"]
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "steering").exists():
                (out / "steering").symlink_to(run_dir / "steering")
            done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        outputs[name] = (json.loads((out / "results.json").read_text()),
                         (out / "predictions.jsonl").read_text().splitlines())
    (one, one_lines), (two, two_lines) = outputs["one"], outputs["two"]
    assert one["n_examples"] == two["n_examples"] == 11 and two["world_size"] == 2
    assert one["steering"]["mu"] == two["steering"]["mu"]
    for name in TRUTHFULQA_GEN_KEYS:
        for variant in ("plain", "steered"):
            assert two["metrics"][name][variant] == pytest.approx(one["metrics"][name][variant], abs=1e-9)
    for category, metrics in one["per_category"].items():
        for name, values in metrics.items():
            for variant, value in values.items():
                assert two["per_category"][category][name][variant] == pytest.approx(value, abs=1e-9)
    assert one_lines == two_lines
    assert [json.loads(line)["uid"] for line in one_lines] == sorted(json.loads(line)["uid"] for line in one_lines)
