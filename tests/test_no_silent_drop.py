"""No silent drops (issue 29, class 3): an empty split is an error naming it and the splits' sizes; a
prompt beyond the model's context is cut from the left (as lm-eval does) with one warning line that
says how many, or refused when its answer alone does not fit; one test question and a four-question
generation test finish with their results (they crashed in results/payload.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.evaluation.items import ChoiceItem, GenerationItem
from svdecode_pl.tasks.context import fit_examples_to_context, fit_items_to_context, model_context_limit
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule
from svdecode_pl.utils.errors import DataFormatError, user_error_message

ROOT = Path(__file__).resolve().parents[1]


def test_empty_split_names_the_split_and_the_sizes():
    """train_fraction 1.0 left no test question: ``test`` printed nothing and exited 0."""
    data = TruthfulQADataModule(synthetic_questions=10, train_fraction=1.0, val_fraction=0.0)
    with pytest.raises(DataFormatError) as info:
        data.test_dataloader()
    assert user_error_message(info.value) == (
        f"{data.source}: split 'test' is empty (train 10, validation 0, test 0 examples); check "
        "--data.train_fraction / --data.val_fraction / --data.limit and the data file")
    with pytest.raises(DataFormatError, match="split 'validation' is empty"):
        data.lm_dataloader("validation")


def choice(uid: int, context: int, answers: list[int]) -> ChoiceItem:
    return ChoiceItem(uid=uid, id=f"q{uid}", context_ids=list(range(context)), answers=[str(a) for a in answers],
                      continuation_ids=[[7] * a for a in answers])


def test_prompts_beyond_the_context_are_cut_from_the_left_with_one_line(capsys):
    items = [choice(0, 10, [2, 3]), choice(1, 30, [2, 5]), choice(2, 31, [1])]
    fitted = fit_items_to_context(items, 32, 0, "data.json: test split")
    # the model reads context + answer but its last token: 30 + 5 - 1 = 34 > 32, cut by 2; 31 + 0 fits
    assert [len(item.context_ids) for item in fitted] == [10, 28, 31]
    assert fitted[1].context_ids[0] == 2  # the left end is dropped, the question's end kept
    err = capsys.readouterr().err.splitlines()
    assert err == ["svdecode: warning: data.json: test split: 1 of 3 questions exceed the model's context of 32 "
                   "tokens: their prompts are cut from the left to fit, as lm-eval does"]
    generated = [GenerationItem(uid=0, id="g", context_ids=list(range(30)), max_new_tokens=None)]
    assert len(fit_items_to_context(generated, 32, 8, "x")[0].context_ids) == 24  # room for 8 new tokens
    with pytest.raises(DataFormatError, match="question 'q0': its answer needs 40 tokens, the model's context holds"):
        fit_items_to_context([choice(0, 5, [41])], 32, 0, "x")
    assert fit_items_to_context(items, None, 0, "x") is items
    capsys.readouterr()
    assert fit_items_to_context([choice(0, 4, [2])], 32, 0, "x")[0].context_ids == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""  # nothing cut, nothing said


def test_warm_start_sequences_beyond_the_context_are_cut_too(capsys):
    from svdecode_pl.tasks.base import LMExample

    examples = [LMExample(list(range(40)), 35), LMExample(list(range(10)), 5)]
    fitted = fit_examples_to_context(examples, 32, "x: train split")
    assert [(len(e.input_ids), e.num_context) for e in fitted] == [(32, 27), (10, 5)]
    assert "1 of 2 sequences exceed the model's context of 32 tokens" in capsys.readouterr().err
    with pytest.raises(DataFormatError, match="example 0: its target alone has 33 tokens"):
        fit_examples_to_context([LMExample(list(range(40)), 7)], 32, "x")


def test_context_limit_is_read_from_the_config():
    assert model_context_limit("svdecode-tiny") == 2048
    assert model_context_limit("/no/such/model") is None


def test_a_question_beyond_the_context_through_the_task(tmp_path, capsys):
    rows = [{"question": f"Is mirror {i} unlucky?", "mc1_targets": {"No.": 1, "Yes.": 0},
             "mc2_targets": {"No.": 1, "Yes.": 0}} for i in range(3)]
    rows.append(dict(rows[0], question=" ".join(["mirror"] * 3000) + "?"))
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    data = TruthfulQADataModule(tokenizer="svdecode-tiny", path=str(path), train_fraction=0.0)
    items = data.eval_items("test")
    assert max(len(i.context_ids) + max(map(len, i.continuation_ids)) - 1 for i in items) <= 2048
    assert f"{path}: test split: 1 of 4 questions exceed the model's context of 2048 tokens" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mc", "gen"])
def test_one_test_question_gives_results(tmp_path, task):
    """One question in the test split (a one-question file, a four-question generation test): the
    per-category means indexed a 0-d mask (torchmetrics squeezes a one-element output) and crashed
    after all the scoring."""
    config = {"mc": ROOT / "configs" / "quickstart.yaml",
              "gen": ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"}
    extra = ["--data.generation.max_new_tokens", "3"] if task == "gen" else []
    if task == "mc":  # TruthfulQA.csv cut to one question (with its category)
        (tmp_path / "one.csv").write_text(
            "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n"
            "Adversarial,Superstitions,Does a broken mirror bring bad luck?,No.,No.; Nothing happens.,Yes.\n")
        extra = ["--data.path", str(tmp_path / "one.csv")]
    run_cli(["test", "--config", str(config[task]), "--model.name_or_path", "svdecode-tiny",
             "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
             "--trainer.logger", "false", "--data.synthetic_questions", "4", *extra])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n_examples"] == 1
    assert all(value["plain"] is not None for value in results["metrics"].values())
