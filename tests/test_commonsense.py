"""Commonsense sets (LLM-Adapters format): readers and errors, answer extraction, the loglik and
generate protocols against independent computations, per-set accuracy, and a CLI run on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import real_data
from lightning.pytorch import Trainer
from peft import LoraConfig, get_peft_model

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.evaluation.evaluator import generate_ids, score_items
from svdecode_pl.models.heads import adapter_disabled
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.recipes.module import SVDecodeModule
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.tasks.commonsense import (
    CommonsenseChoiceItem,
    CommonsenseDataModule,
    CommonsenseGenerationItem,
    read_records,
)
from svdecode_pl.tasks.commonsense_answers import answer_options, canonical_dataset, extract_answer
from svdecode_pl.utils.errors import DataFormatError

ROOT = Path(__file__).resolve().parents[1]

# LLM-Adapters' prompt, written out here independently of the module
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{}\n\n### Response:\n"
)


def boolq(question: str, answer: str) -> dict:
    instruction = (f"Please answer the following question with true or false, question: {question}?"
                   "\n\nAnswer format: true/false")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def arc(question: str, n_options: int, answer: str) -> dict:
    options = " ".join(f"Answer{i}: option {i}." for i in range(1, n_options + 1))
    labels = "/".join(f"answer{i}" for i in range(1, n_options + 1))
    instruction = (f"Please choose the correct answer to the question: {question}\n\n{options}"
                   f"\n\nAnswer format: {labels}")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def piqa(goal: str, answer: str) -> dict:
    instruction = (f"Please choose the correct solution to the question: {goal}\n\nSolution1: a\n\nSolution2: b"
                   "\n\nAnswer format: solution1/solution2")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run many small ops: one intra-op thread is much faster on a shared CPU
    (two threads spin-wait whenever another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """boolq (train + test), ARC-Easy (test only, one question with 3 options), piqa (test only)."""
    files = {
        "boolq/train.json": [boolq(f"is the sky blue number {i}", ["true", "false"][i % 2]) for i in range(6)],
        "boolq/test.json": [boolq("is water wet", "true"), boolq("do fish fly", "false"), boolq("is ice hot", "false")],
        "ARC-Easy/test.json": [arc("Which is a gas?", 4, "answer2"), arc("Which is a metal?", 3, "answer3")],
        "piqa/test.json": [piqa("open a jar", "solution1"), piqa("boil water", "solution2")],
    }
    for name, rows in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path


# -- readers and errors -----------------------------------------------------------------------


def test_reader_and_data_module_splits(data_dir):
    rows = read_records(data_dir / "ARC-Easy" / "test.json", "ARC-Easy")
    assert [len(r.options) for r in rows] == [4, 3] and rows[1].options == ("answer1", "answer2", "answer3")
    dm = CommonsenseDataModule(datasets=["boolq", "arc_easy", "piqa"], data_dir=str(data_dir), limit_test=2)
    assert dm.dataset_names == ["boolq", "ARC-Easy", "piqa"]
    assert dm.metric_names == ["accuracy", "accuracy/boolq", "accuracy/ARC-Easy", "accuracy/piqa"]
    test = dm.split("test")
    assert [e.dataset for e in test] == ["boolq", "boolq", "ARC-Easy", "ARC-Easy", "piqa", "piqa"]  # 2 per set
    assert len(dm.split("train")) == 6  # boolq's train.json only: the others have none
    assert test[0].prompt == PROMPT.format(test[0].instruction)
    # warm-start example: prompt ids, then "the correct answer is true" + EOS with the loss on them only
    example = dm.lm_example(test[0])
    tok = dm.tokenizer
    assert example.input_ids[: example.num_context] == tok(test[0].prompt)["input_ids"]
    assert tok.decode(example.input_ids[example.num_context :]) == "the correct answer is true" + tok.eos_token
    # loglik items: one continuation per offered label, the gold one marked
    item = dm.eval_item(test[3], uid=3)
    assert isinstance(item, CommonsenseChoiceItem) and item.dataset == "ARC-Easy" and item.id == "ARC-Easy/1"
    assert item.answers == ["answer1", "answer2", "answer3"] and item.labels == [0, 0, 1]
    assert [tok.decode(c) for c in item.continuation_ids] == [f"the correct answer is answer{i}" for i in (1, 2, 3)]
    # held-out validation split and train subset are seeded and disjoint
    dm2 = CommonsenseDataModule(datasets=["boolq"], data_dir=str(data_dir), val_size=2, limit_train=3, seed=1)
    train, val = dm2.split("train"), dm2.split("validation")
    assert len(train) == 3 and len(val) == 2 and not {e.index for e in train} & {e.index for e in val}


def test_train_file_takes_precedence(data_dir, tmp_path):
    mixed = tmp_path / "commonsense_mix.json"
    mixed.write_text(json.dumps([boolq("q", "true"), piqa("g", "solution2"), arc("a", 4, "answer4")]))
    dm = CommonsenseDataModule(datasets=["boolq"], data_dir=str(data_dir), train_file=str(mixed))
    assert [e.answer for e in dm.split("train")] == ["true", "solution2", "answer4"]


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, r"boolq/test.json: no such file"),
        ("", DataFormatError, r"boolq/test.json: file is empty"),
        ("[]", DataFormatError, r"boolq/test.json: file has no records"),
        ("{not json", DataFormatError, r"boolq/test.json: not valid JSON"),
        ([boolq("a", "true"), boolq("b", "maybe")], DataFormatError,
         r"boolq/test.json: record 1: field 'answer': unknown label 'maybe' for boolq"),
        ([boolq("a", "true"), {"input": "", "answer": "true"}], DataFormatError,
         r"record 1: field 'instruction': missing"),
        ([{"instruction": "x", "input": ""}], DataFormatError, r"record 0: field 'answer': missing"),
        ([boolq("a", "answer1")], DataFormatError, r"record 0: field 'answer': unknown label 'answer1'"),
        ([{**boolq("a", "true"), "input": 3}], DataFormatError, r"record 0: field 'input': expected a string"),
    ],
)
def test_bad_files_name_file_record_and_field(tmp_path, content, error, message):
    path = tmp_path / "boolq" / "test.json"
    path.parent.mkdir()
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    dm = CommonsenseDataModule(datasets=["boolq"], data_dir=str(tmp_path))
    with pytest.raises(error, match=message):
        dm.split("test")


def test_bad_options_and_arguments(tmp_path):
    path = tmp_path / "arc.json"
    path.write_text(json.dumps([arc("q", 3, "answer4")]))
    with pytest.raises(DataFormatError, match=r"record 0: field 'answer': label 'answer4' is not among the options"):
        read_records(path, "ARC-Easy")
    with pytest.raises(ValueError, match=r"unknown commonsense dataset 'mmlu'"):
        CommonsenseDataModule(datasets=["mmlu"], data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="set data_dir"):
        CommonsenseDataModule(datasets=["boolq"])
    dm = CommonsenseDataModule(datasets=["piqa"], data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="none of the sets .* has a train.json; set train_file"):
        dm.split("train")


# -- answer extraction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, text, label",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "  false, the correct answer is true", "false"),  # the first label in the text
        ("boolq", "The correct answer is True", ""),  # case-sensitive, as LLM-Adapters
        ("boolq", "untrue", "true"),  # anywhere, even inside a word
        ("boolq", "the correct answer is", ""),  # no label: wrong
        ("piqa", "the correct answer is solution2 solution1", "solution2"),
        ("siqa", "the correct answer is answer3", "answer3"),
        ("ARC-Challenge", "answer12", "answer1"),
        ("openbookqa", "the correct answer is answer5", "answer5"),
        ("hellaswag", "ending4", "ending4"),
        ("hellaswag", "answer1", ""),
        ("winogrande", "the correct answer is option2", "option2"),
    ],
)
def test_extract_answer(dataset, text, label):
    assert extract_answer(dataset, text) == label


def test_answer_options_and_names():
    assert answer_options("boolq", "q?\n\nAnswer format: true/false") == ("true", "false")
    assert answer_options("winogrande", "no format line") == ("option1", "option2")
    with pytest.raises(ValueError, match="'answer1'"):
        answer_options("boolq", "q\n\nAnswer format: answer1/answer2")
    assert canonical_dataset("OBQA") == "openbookqa" and canonical_dataset("arc-challenge") == "ARC-Challenge"


# -- loglik protocol --------------------------------------------------------------------------


@torch.no_grad()
def independent_scores(model, tokenizer, prompt: str, labels: list[str], steering=None) -> torch.Tensor:
    """Sum of log p(continuation tokens) of "the correct answer is <label>", one forward pass
    per label over the whole text (steered: log_softmax(z + mu * direction))."""
    context = tokenizer(prompt)["input_ids"]
    scores = []
    for label in labels:
        ids = tokenizer(prompt + f"the correct answer is {label}")["input_ids"]
        assert ids[: len(context)] == context
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        if steering is not None:
            logits = logits + steering.mu * steering.direction
        logp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        scores.append(float(logp[len(context) - 1 :].sum()))
    return torch.tensor(scores)


def test_loglik_accuracy_per_set_matches_independent_argmax(data_dir, tmp_path):
    dm = CommonsenseDataModule(datasets=["boolq", "ARC-Easy", "piqa"], data_dir=str(data_dir), eval_batch_size=3)
    module = SVDecodeModule("svdecode-tiny", peft=None)
    module.configure_model()
    vocab = module.vocab_size
    generator = torch.Generator().manual_seed(0)
    module.steering_vector = SteeringVector(3.0 * torch.randn(vocab, generator=generator), 1.0)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path / "run"))
    trainer.test(module, datamodule=dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "commonsense" and results["n_examples"] == 7
    assert list(results["metrics"]) == dm.metric_names

    model, tok = module.model.eval(), dm.tokenizer
    correct = {"plain": {}, "steered": {}}
    items = dm.eval_items("test")
    records = score_items(model, items, module.steering_vector, tokenizer=tok)
    for example, record in zip(dm.split("test"), records):
        for variant, steering in (("plain", None), ("steered", module.steering_vector)):
            scores = independent_scores(model, tok, PROMPT.format(example.instruction), list(example.options), steering)
            torch.testing.assert_close(torch.tensor(record.scores[variant]), scores, rtol=0, atol=1e-3)
            hit = float(example.options[int(scores.argmax())] == example.answer)
            correct[variant].setdefault(example.dataset, []).append(hit)
    for variant in ("plain", "steered"):
        everything = [h for hits in correct[variant].values() for h in hits]
        assert results["metrics"]["accuracy"][variant] == pytest.approx(sum(everything) / len(everything))
        for name, hits in correct[variant].items():
            assert results["metrics"][f"accuracy/{name}"][variant] == pytest.approx(sum(hits) / len(hits))


# -- generate protocol ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model():
    """The tiny model with a LoRA adapter that is not the identity (dynamic steering has a direction)."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(load_causal_lm("svdecode-tiny"), config).eval()
    # a checkpoint's generation_config may switch on processors; greedy decoding must ignore them
    model.get_base_model().generation_config.repetition_penalty = 1.5
    model.get_base_model().generation_config.no_repeat_ngram_size = 2
    return model


@torch.no_grad()
def manual_greedy(model, prompt: list[int], steps: int, eos: int, steering=None) -> list[int]:
    """Greedy decoding by full forward passes, no cache, no padding."""
    ids, new = list(prompt), []
    for _ in range(steps):
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, -1].float()
        if steering is not None:
            base = None
            if steering.needs_base_logits:
                with adapter_disabled(model):
                    base = model(input_ids=x).logits[0, -1].float()
            logits = steering.steer(logits, base)
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
        ids.append(token)
    return new


def test_generate_plain_and_steered(data_dir, lora_model):
    dm = CommonsenseDataModule(datasets=["boolq", "piqa"], data_dir=str(data_dir), protocol="generate",
                               max_new_tokens=4)
    items = dm.eval_items("test")
    tok = dm.tokenizer
    assert {type(item) for item in items} == {CommonsenseGenerationItem}
    prompts = [item.context_ids for item in items]
    assert len(set(map(len, prompts))) > 1  # the batch is left-padded
    vocab = lora_model.get_base_model().config.vocab_size
    true_id = tok(" true", add_special_tokens=False)["input_ids"]
    assert len(true_id) == 1
    static = SteeringVector(torch.nn.functional.one_hot(torch.tensor(true_id[0]), vocab).float(), 1e4)
    dynamic = SteeringVector(None, 200.0, mode="dynamic")

    # the batched, left-padded `generate` decodes as plain greedy decoding does, plain and steered
    for steering in (None, static, dynamic):
        batched = generate_ids(lora_model, prompts, 4, steering, tok, tok.pad_token_id)
        for prompt, ids in zip(prompts, batched):
            assert ids == manual_greedy(lora_model, prompt, 4, tok.eos_token_id, steering)

    for steering in (static, dynamic):
        records = score_items(lora_model, items, steering, pad_id=tok.pad_token_id, tokenizer=tok)
        assert [r.uid for r in records] == list(range(len(items)))
        for record, item in zip(records, items):
            assert record.dataset == item.dataset and record.answer == item.answer
            for variant in ("plain", "steered"):
                text, label = record.generation[variant], record.choice[variant]
                assert isinstance(text, str) and label == extract_answer(item.dataset, text)
                assert record.metrics[variant] == {
                    "accuracy": float(label == item.answer),
                    f"accuracy/{item.dataset}": float(label == item.answer),
                }
        if steering is static:  # a huge mu toward " true": every boolq response now says true
            for record in records:
                if record.dataset == "boolq":
                    assert "true" not in record.generation["plain"]
                    assert record.generation["steered"] == " true" * 4 and record.choice["steered"] == "true"
        else:
            assert any(r.generation["steered"] != r.generation["plain"] for r in records)
    unsteered = score_items(lora_model, items[:1], None, tokenizer=tok)[0]
    assert unsteered.generation["steered"] is None and unsteered.metrics["steered"] is None


# -- configs and CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart", "paper"])
def test_configs_parse(name):
    from svdecode_pl.cli.lightning import SVDecodeCLI
    from svdecode_pl.tasks.base import TaskDataModule

    configs = {"quickstart": ["commonsense/quickstart.yaml"],
               "paper": ["paper/trainer.yaml", "model/qwen2.5-7b.yaml", "peft/lora.yaml", "data/commonsense.yaml"]}
    cli = SVDecodeCLI(SVDecodeModule, TaskDataModule, subclass_mode_data=True, run=False, args=[
        *[a for c in configs[name] for a in ("--config", str(ROOT / "configs" / c))],
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.logger", "false",
    ])
    assert isinstance(cli.datamodule, CommonsenseDataModule)
    hp = cli.datamodule.hparams
    if name == "paper":
        assert len(cli.datamodule.dataset_names) == 8 and hp.protocol == "generate"
        assert cli.model.hparams.name_or_path == "Qwen/Qwen2.5-7B" and hp.tokenizer == "Qwen/Qwen2.5-7B"
    else:
        assert hp.tokenizer == "svdecode-tiny" and hp.data_dir == "../shared/data/commonsense"


def test_cli_fit_and_test_on_real_sets(tmp_path):
    data = real_data("commonsense")
    for name in ("boolq", "piqa"):
        real_data("commonsense", name, "test.json")
    args = [
        "--config", str(ROOT / "configs" / "commonsense" / "quickstart.yaml"),
        "--data.data_dir", str(data),
        "--data.datasets", "[boolq, piqa]",
        "--data.limit_train", "24",
        "--data.limit_test", "3",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false",
    ]
    run_cli(["fit", *args, "--trainer.max_steps", "3"])
    assert (tmp_path / "steering" / "steering_vector.json").exists()
    run_cli(["test", *args, "--model.adapter_path", str(tmp_path / "adapter"),
             "--data.protocol", "generate", "--data.max_new_tokens", "3"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "commonsense" and results["n_examples"] == 6
    assert list(results["metrics"]) == ["accuracy", "accuracy/boolq", "accuracy/piqa"]
    for values in results["metrics"].values():
        assert 0.0 <= values["plain"] <= 1.0 and 0.0 <= values["steered"] <= 1.0
    assert results["steering"]["mode"] == "static"
