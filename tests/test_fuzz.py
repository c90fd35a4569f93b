"""Fuzzing every file format the project reads: valid files mutated at random (seeded) end either
in success or in one clear error line through the CLI's own classification
(:func:`svdecode_pl.utils.errors.user_error_message`), never in a bug's traceback.

Each data case goes through the task's data module as a run would: read, split, every warm-start
sequence and every evaluation item built with the tiny model's tokenizer. The steering cases go
through :meth:`SteeringVector.load`. A few mutated files also run through the real console script
(``tests/test_errors.py`` covers each named bad input there).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import mc_records

from svdecode_pl.models.loading import load_tokenizer
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.tasks.commonsense import CommonsenseDataModule
from svdecode_pl.tasks.completion import PromptCompletionDataModule
from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule
from svdecode_pl.utils.errors import user_error_message

ROOT = Path(__file__).resolve().parents[1]
SEED = 20251123
CASES_PER_FORMAT = 50
HUGE = "lorem ipsum " * 20_000  # 240k characters
WRONG_VALUES = [None, 0, 3.5, True, [], ["a", 1], {}, {"x": 1}, "", "   ", HUGE, "\u00e9\u4e2d\U0001f600"]


# -- valid files ------------------------------------------------------------------------------


def hub_records(n: int = 6) -> list[dict]:
    return [{"question": f"Is {i} a lucky number?", "id": f"q{i}",
             "mc1_targets": {"choices": ["No.", "Yes.", "Always."], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": ["No.", "Not really.", "Yes."], "labels": [1, 1, 0]}} for i in range(n)]


def csv_rows(n: int = 6) -> list[dict]:
    return [{"Type": "Adversarial", "Category": "Misconceptions" if i % 2 else "Superstitions",
             "Question": f"What happens if you step on crack {i}?", "Best Answer": "Nothing happens.",
             "Correct Answers": "Nothing happens; Nothing in particular", "Incorrect Answers": "Bad luck; You fall",
             "Source": "https://example.org"} for i in range(n)]


def commonsense_records(n: int = 6) -> list[dict]:
    return [{"instruction": f"Is the sky blue on day {i}?\n\nAnswer format: true/false", "input": "",
             "output": f"the correct answer is {'true' if i % 2 else 'false'}",
             "answer": "true" if i % 2 else "false"} for i in range(n)]


def completion_records(n: int = 6) -> list[dict]:
    return [{"prompt": f"Q: {i} plus one?\nA:", "completion": f" {i + 1}", "id": f"c{i}",
             "category": "math"} for i in range(n)]


def to_csv(rows: list) -> bytes:
    """A header of the first record's keys; a record that is no object becomes a one-cell row."""
    fields = list(rows[0]) if rows and isinstance(rows[0], dict) else ["Question"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(fields)
    for row in rows:
        writer.writerow([row.get(key, "") for key in fields] if isinstance(row, dict) else [row])
    return out.getvalue().encode("utf-8")


def to_json(rows: list) -> bytes:
    return json.dumps(rows, ensure_ascii=False).encode("utf-8")


def to_jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


# -- mutations --------------------------------------------------------------------------------


def mutate_rows(rows: list, rng: random.Random) -> tuple[str, list]:
    """A structural mutation of a list of records (one or two at once)."""
    rows = copy.deepcopy(rows)
    kinds = []
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.choice(["drop_field", "wrong_type", "empty", "huge", "duplicate", "drop_record", "not_object",
                           "nested_wrong", "unicode", "no_records"])
        kinds.append(kind)
        if not rows:
            break
        index = rng.randrange(len(rows))
        row = rows[index]
        keys = list(row) if isinstance(row, dict) else []
        if kind == "drop_field" and keys:
            del row[rng.choice(keys)]
        elif kind == "wrong_type" and keys:
            row[rng.choice(keys)] = copy.deepcopy(rng.choice(WRONG_VALUES))
        elif kind == "empty" and keys:
            row[rng.choice(keys)] = rng.choice(["", " ", "\n", ";"])
        elif kind == "huge" and keys:
            row[rng.choice(keys)] = HUGE
        elif kind == "duplicate":
            rows.insert(rng.randrange(len(rows) + 1), copy.deepcopy(row))
        elif kind == "drop_record":
            del rows[index]
        elif kind == "not_object":
            rows[index] = rng.choice(WRONG_VALUES[:6])
        elif kind == "nested_wrong" and keys:
            nested = [k for k in keys if isinstance(row[k], dict)]
            if nested:
                inner = row[rng.choice(nested)]
                if inner:
                    inner[rng.choice(list(inner))] = copy.deepcopy(rng.choice(WRONG_VALUES))
        elif kind == "unicode" and keys:
            row[rng.choice(keys)] = "\u202e\x00\ud7ff tab\tnewline\n" + str(row[rng.choice(keys)])
        elif kind == "no_records":
            rows = []
    return "+".join(kinds), rows


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A byte-level mutation: truncation, invalid UTF-8, flipped bytes, an empty file."""
    kind = rng.choice(["truncate", "invalid_utf8", "flip", "empty", "duplicate_tail"])
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "invalid_utf8":
        at = rng.randrange(len(data) + 1)
        return kind, data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xfe\xfe"]) + data[at:]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(out))
            out[at] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "duplicate_tail":
        return kind, data + data[len(data) // 2 :]
    return kind, b""


# -- running one case -------------------------------------------------------------------------


class Outcome:
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.bugs: list[str] = []
        self.successes = 0
        self.errors: list[tuple[str, Path, str]] = []  # (case, file, the one line)

    def run(self, label: str, path: Path, action: Callable[[], object]) -> None:
        self.kinds[label.split(":")[0]] += 1
        try:
            action()
            self.successes += 1
        except Exception as error:  # noqa: BLE001 -- classifying every error is the point
            message = user_error_message(error)
            if message is None:
                frame = traceback.extract_tb(error.__traceback__)[-1]
                self.bugs.append(f"{label}: {type(error).__name__}: {str(error)[:200]} "
                                 f"({Path(frame.filename).name}:{frame.lineno})")
                return
            assert message and "\n" not in message, (label, message)
            self.errors.append((label, path, message))
            if str(path) not in message and path.name not in message:
                self.bugs.append(f"{label}: the error does not name the file: {message}")
            # the problem, with the file name and numbers taken out, to report what was found
            problem = message.replace(str(path), "<file>").split(": ", 1)[-1]
            self.messages["".join("#" if c.isdigit() else c for c in problem)[:90]] += 1


def exercise(datamodule, tokenizer) -> None:
    """What a run does with a data module: read and split, build every sequence and item."""
    datamodule.tokenizer = tokenizer
    for split in ("train", "validation", "test"):
        examples = datamodule.split(split)
        for example in examples:
            datamodule.lm_example(example)
    datamodule.eval_items("test")
    datamodule.eval_groups("test")


FORMATS = {
    # name: (file name, valid rows, serialiser, data module factory)
    "truthfulqa_json": ("mc_task.json", mc_records, to_json, lambda p: TruthfulQADataModule(path=str(p))),
    "truthfulqa_jsonl": ("mc.jsonl", hub_records, to_jsonl, lambda p: TruthfulQADataModule(path=str(p))),
    "truthfulqa_csv": ("TruthfulQA.csv", csv_rows, to_csv, lambda p: TruthfulQADataModule(path=str(p))),
    "truthfulqa_gen_csv": ("TruthfulQA.csv", csv_rows, to_csv,
                           lambda p: TruthfulQAGenerationDataModule(path=str(p))),
    "commonsense_json": ("boolq/test.json", commonsense_records, to_json,
                         lambda p: CommonsenseDataModule(data_dir=str(p.parent.parent), datasets=["boolq"],
                                                         train_file=str(p), val_size=1)),
    "completion_jsonl": ("data.jsonl", completion_records, to_jsonl,
                         lambda p: PromptCompletionDataModule(path=str(p), train_fraction=0.5)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("svdecode-tiny")


def test_valid_files_load(tmp_path, tokenizer):
    """The unmutated files are valid: every fuzz case starts from a file that loads."""
    for name, (file_name, rows, serialise, factory) in FORMATS.items():
        path = tmp_path / name / file_name
        path.parent.mkdir(parents=True)
        path.write_bytes(serialise(rows()))
        exercise(factory(path), tokenizer)


def _steering_case(rng: random.Random, directory: Path) -> str:
    vocab = 32
    SteeringVector(torch.randn(vocab), -1.0, mode=rng.choice(["static", "dynamic"]),
                   metadata={"vocab_size": vocab, "tokenizer_fingerprint": "abc"}).save(directory)
    meta_file, tensor_file = directory / "steering_vector.json", directory / "steering_vector.safetensors"
    kind = rng.choice(["json_fields", "json_bytes", "tensor_bytes", "tensor_content", "missing_file"])
    if kind == "json_fields":
        meta = json.loads(meta_file.read_text())
        sub, rows = mutate_rows([meta, meta["metadata"]], rng)
        if rows and isinstance(rows[0], dict):
            if len(rows) > 1 and isinstance(rows[1], dict) and isinstance(rows[0].get("metadata"), dict):
                rows[0]["metadata"] = rows[1]
            payload = rows[0]
        else:
            payload = rows
        meta_file.write_text(json.dumps(payload))
        return f"{kind}:{sub}"
    if kind == "json_bytes":
        sub, data = mutate_bytes(meta_file.read_bytes(), rng)
        meta_file.write_bytes(data)
        return f"{kind}:{sub}"
    if kind == "tensor_bytes":
        sub, data = mutate_bytes(tensor_file.read_bytes(), rng)
        tensor_file.write_bytes(data)
        return f"{kind}:{sub}"
    if kind == "tensor_content":
        from safetensors.torch import save_file

        sub = rng.choice(["shape", "dtype", "nan", "inf", "name", "empty"])
        tensor = {"shape": torch.zeros(4, 8), "dtype": torch.zeros(vocab, dtype=torch.float64),
                  "nan": torch.full((vocab,), float("nan")), "inf": torch.full((vocab,), -float("inf")),
                  "name": torch.zeros(vocab), "empty": torch.zeros(0)}[sub]
        save_file({"other" if sub == "name" else "direction": tensor}, str(tensor_file))
        return f"{kind}:{sub}"
    (meta_file if rng.random() < 0.5 else tensor_file).unlink()
    return kind


def test_fuzz_every_format(tmp_path, tokenizer):
    rng = random.Random(SEED)
    outcome = Outcome()
    started = time.monotonic()
    for name, (file_name, rows, serialise, factory) in FORMATS.items():
        for case in range(CASES_PER_FORMAT):
            path = tmp_path / f"{name}_{case}" / file_name
            path.parent.mkdir(parents=True)
            if rng.random() < 0.6:
                kind, mutated = mutate_rows(rows(), rng)
                data = serialise(mutated)
            else:
                kind, data = mutate_bytes(serialise(rows()), rng)
            path.write_bytes(data)
            outcome.run(f"{name}:{kind}", path, lambda f=factory, p=path: exercise(f(p), tokenizer))
    for case in range(CASES_PER_FORMAT):
        directory = tmp_path / f"steering_{case}" / "steering"
        kind = _steering_case(rng, directory)
        outcome.run(f"steering:{kind}", directory, lambda d=directory: SteeringVector.load(d))
    elapsed = time.monotonic() - started
    total = sum(outcome.kinds.values())
    report = "\n".join(f"{count:4d}  {message}" for message, count in outcome.messages.most_common())
    print(f"\n{total} fuzz cases in {elapsed:.1f}s: {outcome.successes} loaded, "
          f"{total - outcome.successes - len(outcome.bugs)} clear errors, {len(outcome.bugs)} bugs\n{report}")
    assert total >= 300
    assert not outcome.bugs, "\n".join(outcome.bugs[:40])
    assert outcome.successes > 0 and sum(outcome.messages.values()) > 100  # both outcomes are exercised
    assert elapsed < 120


@pytest.mark.slow
def test_fuzzed_files_through_the_console_script(tmp_path):
    """A handful of fuzzed TruthfulQA files through the real ``svdecode test``: the same one line
    as in-process, exit status 2, no traceback."""
    rng = random.Random(SEED + 1)
    outcome = Outcome()
    file_name, rows, serialise, factory = FORMATS["truthfulqa_json"]
    tokenizer = load_tokenizer("svdecode-tiny")
    case = 0
    while len([e for e in outcome.errors if "split '" not in e[2]]) < 3:
        path = tmp_path / f"case_{case}" / file_name
        path.parent.mkdir(parents=True)
        kind, data = mutate_rows(rows(), rng) if case % 2 else mutate_bytes(serialise(rows()), rng)
        path.write_bytes(serialise(data) if case % 2 else data)
        outcome.run(kind, path, lambda p=path: exercise(factory(p), tokenizer))
        case += 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SVDECODE_DEBUG"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    command = [str(Path(sys.executable).parent / "svdecode"), "test", "--config", quickstart,
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cases = [(path, message) for _, path, message in outcome.errors if "split '" not in message][:3]
    # one run directory each: the three run at once, and a run directory takes one writer
    processes = [(subprocess.Popen([*command, "--data.path", str(path), "--trainer.default_root_dir",
                                    str(tmp_path / f"run_{index}")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env), message)
                 for index, (path, message) in enumerate(cases)]
    for process, message in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 2 and "Traceback" not in out + err, err[-2000:]
        assert [line for line in err.splitlines() if line.startswith("svdecode:")] == [f"svdecode: error: {message}"]
