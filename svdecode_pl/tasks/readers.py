"""Readers of the users' data files (JSON, JSONL, CSV): every problem is a
:class:`DataFormatError` naming the file, the record and the field."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svdecode_pl.corpus.questions import MCQuestion
from svdecode_pl.utils.errors import DataFormatError


def _fail(path: Path | str, record: int | str, fieldname: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{path}: record {record}: field {fieldname!r}: {problem}")


def _targets(path: Path, index: int, raw: dict, name: str) -> tuple[list[str], list[int]]:
    if name not in raw:
        raise _fail(path, index, name, "missing")
    value = raw[name]
    if isinstance(value, dict) and "choices" in value and "labels" in value:
        choices, labels = value["choices"], value["labels"]
        if not isinstance(choices, list) or not isinstance(labels, list):
            raise _fail(path, index, name, "'choices' and 'labels' must be lists")
        if len(choices) != len(labels):
            raise _fail(path, index, name, f"{len(choices)} choices but {len(labels)} labels")
    elif isinstance(value, dict):
        choices, labels = list(value.keys()), list(value.values())
    else:
        raise _fail(path, index, name, "expected an answer -> label mapping or {choices, labels}")
    for answer, label in zip(choices, labels):
        if not isinstance(answer, str) or not answer.strip():
            raise _fail(path, index, name, "an answer is empty or not a string")
        if label not in (0, 1):
            raise _fail(path, index, name, f"label {label!r} of answer {answer!r} is not 0 or 1")
    return choices, [int(x) for x in labels]


def validate(question: MCQuestion, path: Path | str, index: int) -> MCQuestion:
    """Check what scoring needs: a question, and a true and a false answer in both sets."""
    if not isinstance(question.question, str) or not question.question.strip():
        raise _fail(path, index, "question", "missing or empty")
    for name, labels in (("mc1_targets", question.mc1_labels), ("mc2_targets", question.mc2_labels)):
        if 1 not in labels:
            raise _fail(path, index, name, "no true answer")
        if 0 not in labels:
            raise _fail(path, index, name, "no false answer")
    if question.mc1_labels.count(1) != 1:
        raise _fail(path, index, "mc1_targets", f"{question.mc1_labels.count(1)} true answers, expected exactly 1")
    return question


def from_json_record(raw: Any, path: Path, index: int) -> MCQuestion:
    """A record of ``mc_task.json`` or of the hub's JSON/JSONL form."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: record {index}: expected a JSON object, got {type(raw).__name__}")
    if "question" not in raw:
        raise _fail(path, index, "question", "missing")
    mc1 = _targets(path, index, raw, "mc1_targets")
    mc2 = _targets(path, index, raw, "mc2_targets")
    record_id = str(raw.get("id", index))
    return validate(MCQuestion(record_id, raw["question"], *mc1, *mc2), path, index)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not valid UTF-8 (byte {err.start})") from None


def read_json_rows(path: str | Path) -> list[Any]:
    """The records of a JSON list (or a JSON object holding one list) or a JSONL file; errors name
    the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise DataFormatError(f"{path}: file is empty")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(rows, dict):  # {"validation": [...]} or similar
        rows = next((v for v in rows.values() if isinstance(v, list)), None)
    if not isinstance(rows, list):
        raise DataFormatError(f"{path}: expected a JSON list of records")
    return rows


def read_json(path: Path) -> list[MCQuestion]:
    return [from_json_record(raw, path, i) for i, raw in enumerate(read_json_rows(path))]

_CSV_FIELDS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def _split_answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a UTF-8 CSV file; errors name the file and the line."""
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            return list(reader.fieldnames or []), list(reader)
        except csv.Error as err:
            raise DataFormatError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None


def read_csv(path: Path) -> list[MCQuestion]:
    """TruthfulQA.csv: MC1 = best answer vs the incorrect ones; MC2 = all correct vs incorrect."""
    fieldnames, rows = read_csv_rows(path)
    missing = [f for f in _CSV_FIELDS if f not in fieldnames]
    if missing:
        raise DataFormatError(f"{path}: header: missing column(s) {', '.join(map(repr, missing))}")
    questions = []
    for index, row in enumerate(rows):
        for name in _CSV_FIELDS:
            if not (row.get(name) or "").strip():
                raise _fail(path, index, name, "missing or empty")
        best = row["Best Answer"].strip()
        correct = _split_answers(row["Correct Answers"])
        if best not in correct:
            correct.insert(0, best)
        incorrect = _split_answers(row["Incorrect Answers"])
        question = MCQuestion(
            id=str(index),
            question=row["Question"].strip(),
            mc1_choices=[best, *incorrect],
            mc1_labels=[1] + [0] * len(incorrect),
            mc2_choices=[*correct, *incorrect],
            mc2_labels=[1] * len(correct) + [0] * len(incorrect),
            extra={k: row[k] for k in ("Type", "Category") if k in row},
        )
        questions.append(validate(question, path, index))
    if not questions:
        raise DataFormatError(f"{path}: file has no records")
    return questions


def read_by_suffix(path: str | Path, from_csv: Callable[[Path], list], from_json: Callable[[Path], list]) -> list:
    """The records of a local ``.csv`` or ``.json``/``.jsonl`` file, read by the reader its suffix
    names; a missing file, another suffix or no record is the user's mistake, said the same way
    for every task."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".csv":
        records = from_csv(path)
    elif path.suffix in (".json", ".jsonl"):
        records = from_json(path)
    else:
        raise DataFormatError(f"{path}: unknown format (expected .json, .jsonl or .csv)")
    if not records:
        raise DataFormatError(f"{path}: file has no records")
    return records


def read_mc_file(path: str | Path) -> list[MCQuestion]:
    """Read TruthfulQA MC questions from a local file, choosing the reader by suffix."""
    return read_by_suffix(path, read_csv, read_json)
