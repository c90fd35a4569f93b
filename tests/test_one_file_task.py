"""A new task is one file: this test file defines a task (its data module and its item type, which
grades itself and fills its own record fields) and runs it through ``svdecode fit``, ``test`` and
``predict`` by its import path, without touching the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.items import GenerationItem
from svdecode_pl.scoring.encoding import encode_prompt_target
from svdecode_pl.tasks.base import LMExample, Split, TaskDataModule, seeded_splits

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow"]


@dataclass(kw_only=True)
class EchoItem(GenerationItem):
    """A prompt whose answer repeats one word; the record also says which word."""

    word: str

    def grade(self, text: str) -> tuple[str | None, dict[str, float]]:
        answer = text.strip().split(" ")[0] if text.strip() else ""
        return answer, {"echo": float(answer == self.word)}

    def record_fields(self, choices: dict[str, str | None]) -> dict[str, Any]:
        return {"answer": self.word, "choice": choices}


class EchoDataModule(TaskDataModule):
    """Repeat the word: ``Say red: red``."""

    task_name = "echo"
    task_metrics = ("echo",)

    def __init__(self, tokenizer: str = "svdecode-tiny", seed: int = 0, batch_size: int = 4,
                 eval_batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    @property
    def source(self) -> str:
        return f"echo({len(WORDS)} words)"

    def load_split(self, name: Split) -> list[str]:
        return seeded_splits(WORDS, self.hparams.seed, 0.5, 0.0)[name]

    def lm_example(self, word: str) -> LMExample:
        context, target = encode_prompt_target(self.tokenizer, f"Say {word}:", f" {word}")
        return LMExample(context + target, len(context))

    def eval_item(self, word: str, uid: int) -> EchoItem:
        return EchoItem(uid=uid, id=word, context_ids=self.tokenizer(f"Say {word}:")["input_ids"], word=word)

    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=3, stop=["\n"])


@pytest.mark.slow
def test_a_task_defined_in_one_file_runs_through_the_cli(tmp_path):
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    common = ["--data.class_path", "test_one_file_task.EchoDataModule", "--model.name_or_path", "svdecode-tiny",
              "--model.peft.class_path", "peft.LoraConfig", "--model.peft.init_args.target_modules", "all-linear",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]

    def svdecode(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "svdecode_pl.cli", *args, *common], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    svdecode("fit", "--trainer.max_steps", "2")
    adapter = ["--model.adapter_path", str(tmp_path / "adapter")]
    svdecode("test", *adapter)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "echo" and results["n_examples"] == 6
    assert set(results["metrics"]) == {"echo"} and results["metrics"]["echo"]["steered"] is not None

    svdecode("predict", *adapter, "--trainer.callbacks+=svdecode_pl.recipes.callbacks.JSONLPredictionWriter")
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["answer"] for r in records) == sorted(seeded_splits(WORDS, 0, 0.5, 0.0)["test"])
    for record in records:  # the item's own fields and grading, written by the package's writer
        for variant in ("plain", "steered"):
            assert record["metrics"][variant]["echo"] == float(record["choice"][variant] == record["answer"])
