"""TruthfulQA readers, splits, prompts, and clear errors on bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import mc_records, real_data

from svdecode_pl.corpus.primer import QA_PRIMER
from svdecode_pl.corpus.synthetic import synthetic_questions
from svdecode_pl.tasks.readers import read_mc_file
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule
from svdecode_pl.utils.errors import DataFormatError


def test_mc_task_json(mc_task_file):
    questions = read_mc_file(mc_task_file)
    assert len(questions) == 6
    q = questions[0]
    assert q.best_answer == "Nothing happens."
    assert q.mc2_labels == [1, 1, 0, 0]
    assert q.answers == ["Nothing happens.", "Bad luck for years.", "You die.", "Nothing in particular."]


def test_hub_jsonl_and_csv_give_the_same_questions(tmp_path, mc_task_file):
    rows = mc_records()
    jsonl = tmp_path / "mc.jsonl"
    with jsonl.open("w") as handle:
        for r in rows:
            hub = {k: {"choices": list(v), "labels": list(v.values())} for k, v in r.items() if k != "question"}
            handle.write(json.dumps({"question": r["question"], **hub}) + "\n")
    csv_path = tmp_path / "TruthfulQA.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
        )
        for r in rows:
            writer.writerow(["Adversarial", "Misc", r["question"], "Nothing happens.",
                             "Nothing happens.; Nothing in particular.", "Bad luck for years.; You die.", "x"])
    reference = read_mc_file(mc_task_file)
    for other in (read_mc_file(jsonl), read_mc_file(csv_path)):
        assert [(q.question, q.mc1_choices, q.mc1_labels, q.mc2_choices, q.mc2_labels) for q in other] == [
            (q.question, q.mc1_choices, q.mc1_labels, q.mc2_choices, q.mc2_labels) for q in reference
        ]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[2].pop("mc2_targets"), r"record 2: field 'mc2_targets': missing"),
        (lambda r: r[1].pop("question"), r"record 1: field 'question': missing"),
        (lambda r: r[3].update(mc2_targets={"a": 0, "b": 0}), r"record 3: field 'mc2_targets': no true answer"),
        (lambda r: r[0].update(mc1_targets={"a": 1}), r"record 0: field 'mc1_targets': no false answer"),
        (lambda r: r[4].update(mc1_targets={"a": 1, "b": 2}), r"record 4: field 'mc1_targets': label 2"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, mutate, message):
    rows = mc_records()
    mutate(rows)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=str(path) + ": " + message):
        read_mc_file(path)


def test_empty_missing_and_broken_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataFormatError, match=f"{empty}: file is empty"):
        read_mc_file(empty)
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        read_mc_file(tmp_path / "nope.json")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x"}\n{oops\n')
    with pytest.raises(DataFormatError, match=f"{broken}: line 2: not valid JSON"):
        read_mc_file(broken)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(DataFormatError, match="missing column"):
        read_mc_file(bad_csv)


def test_split_is_deterministic_and_disjoint(mc_task_file):
    def splits(seed):
        dm = TruthfulQADataModule(path=str(mc_task_file), train_fraction=0.5, seed=seed)
        dm.setup()
        return {k: [q.question for q in v] for k, v in dm.splits.items()}

    a, b = splits(0), splits(0)
    assert a == b
    assert len(a["train"]) == 3 and len(a["test"]) == 3
    assert not set(a["train"]) & set(a["test"])
    dm = TruthfulQADataModule(path=str(mc_task_file), train_fraction=0.0)
    dm.setup()
    assert len(dm.splits["test"]) == 6 and not dm.splits["train"]


def test_prompt_and_continuation_tokens(mc_task_file):
    dm = TruthfulQADataModule(path=str(mc_task_file), train_fraction=0.5)
    dm.setup()
    question = dm.splits["test"][0]
    assert dm.prompt(question) == f"{QA_PRIMER}\n\nQ: {question.question}\nA:"
    item = dm.eval_item(question)
    tok = dm.tokenizer
    for answer, continuation in zip(item.answers, item.continuation_ids):
        assert tok.decode(item.context_ids + continuation) == dm.prompt(question) + " " + answer
    example = dm.lm_example(question)
    assert tok.decode(example.input_ids[example.num_context:]) == " " + question.best_answer


def test_synthetic_task_is_deterministic_and_valid():
    a, b = synthetic_questions(50, seed=3), synthetic_questions(50, seed=3)
    assert [q.mc2_choices for q in a] == [q.mc2_choices for q in b]
    other = synthetic_questions(50, seed=4)
    assert [q.question for q in other] != [q.question for q in a]
    for q in a:
        assert q.mc1_labels.count(1) == 1 and 0 in q.mc2_labels and 1 in q.mc2_labels


def test_real_truthfulqa_files_agree():
    mc = read_mc_file(real_data("truthfulqa", "mc_task.json"))
    table = read_mc_file(real_data("truthfulqa", "TruthfulQA.csv"))
    assert len(mc) == 817 and len(table) == 817
    assert all(q.mc1_labels[0] == 1 for q in mc)
    # the CSV's questions are the same set as the MC task's
    assert len({q.question for q in mc} & {q.question for q in table}) > 780


def test_token_ids_match_the_tokenizer_and_items_skip_the_device_walk(mc_task_file):
    """Fast tokenizers encode through their Rust backend: the same ids as ``tokenizer(texts)``;
    evaluation batches (lists of items, no tensors) go to the device untouched, while the
    warm-start batches (dicts of tensors) still move."""
    from svdecode_pl.scoring.encoding import token_ids

    dm = TruthfulQADataModule(path=str(mc_task_file), train_fraction=0.0)
    dm.setup()
    texts = [dm.prompt(q) + " " + a for q in dm.splits["test"] for a in q.answers]
    assert token_ids(dm.tokenizer, texts) == dm.tokenizer(texts)["input_ids"]
    items = dm.eval_items("test")
    assert dm.transfer_batch_to_device(items, torch.device("cpu"), 0) is items
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["input_ids"].device.type == "meta"
