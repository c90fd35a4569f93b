"""The eight commonsense sets of LLM-Adapters (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA) as a LightningDataModule: warm-start on a train file, two evaluation
protocols, accuracy per set.

Records are LLM-Adapters' JSON: ``{"instruction", "input", "output", "answer"}``, ``output``
reading ``the correct answer is <label>`` and ``answer`` the label (see
:mod:`svdecode_pl.tasks.commonsense_answers`). The prompt is LLM-Adapters' Alpaca-style ``generate_prompt``.

Protocols:

* ``generate``: greedy decoding of up to ``max_new_tokens`` tokens, plain and steered, and the
  label read from the text as LLM-Adapters does (items of kind ``"generate"``);
* ``loglik``: every label the question offers, as the continuation
  ``the correct answer is <label>``, ranked by log-likelihood (items of kind ``"multiple_choice"``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.items import ChoiceItem, EvalItem, GenerationItem
from svdecode_pl.metrics.choice import accuracy_score
from svdecode_pl.scoring.encoding import encode_prompt_target
from svdecode_pl.tasks.base import LMExample, Split, TaskDataModule, check_task_values
from svdecode_pl.tasks.commonsense_answers import (
    ALL_LABELS,
    DATASET_LABELS,
    answer_options,
    canonical_dataset,
    extract_answer,
)
from svdecode_pl.tasks.readers import read_json_rows
from svdecode_pl.utils.errors import DataFormatError, OptionError

Protocol = Literal["generate", "loglik"]

#: the dataset name of training examples read from ``train_file`` (a mix of the sets)
TRAIN_FILE_SET = "train_file"

_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def generate_prompt(instruction: str, input: str = "") -> str:
    """LLM-Adapters' Alpaca-style prompt (their template, without the stray indentation of
    their source), ending where the response starts."""
    if input:
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return _PROMPT.format(instruction=instruction)


def target_text(label: str) -> str:
    """The response LLM-Adapters trains on for a label."""
    return f"the correct answer is {label}"


@dataclass
class CommonsenseExample:
    """One record of a set (or of a mixed training file), validated."""

    dataset: str
    index: int
    instruction: str
    input: str
    output: str
    answer: str
    options: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return generate_prompt(self.instruction, self.input)


def _fail(source: str, index: int, fieldname: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{source}: record {index}: field {fieldname!r}: {problem}")


def parse_record(raw: Any, dataset: str, source: str, index: int) -> CommonsenseExample:
    """Validate one LLM-Adapters record; ``dataset`` is a set name or :data:`TRAIN_FILE_SET`."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{source}: record {index}: expected a JSON object, got {type(raw).__name__}")
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _fail(source, index, "instruction", "missing or empty" if not instruction else "not a string")
    extra_input = raw.get("input") or ""
    if not isinstance(extra_input, str):
        raise _fail(source, index, "input", f"expected a string, got {type(extra_input).__name__}")
    if "answer" not in raw:
        raise _fail(source, index, "answer", "missing")
    answer = raw["answer"]
    labels = ALL_LABELS if dataset == TRAIN_FILE_SET else DATASET_LABELS[dataset]
    if not isinstance(answer, str) or answer not in labels:
        where = "any commonsense set" if dataset == TRAIN_FILE_SET else dataset
        raise _fail(source, index, "answer", f"unknown label {answer!r} for {where} (expected one of {list(labels)})")
    output = raw.get("output", target_text(answer))
    if not isinstance(output, str) or not output.strip():
        raise _fail(source, index, "output", "empty or not a string")
    options: tuple[str, ...] = (answer,)
    if dataset != TRAIN_FILE_SET:
        try:
            options = answer_options(dataset, instruction)
        except ValueError as err:
            raise _fail(source, index, "instruction", str(err)) from None
        if answer not in options:
            raise _fail(source, index, "answer", f"label {answer!r} is not among the options {list(options)}")
    return CommonsenseExample(dataset, index, instruction, extra_input, output, answer, options)


def parse_rows(rows: Any, dataset: str, source: str) -> list[CommonsenseExample]:
    if not isinstance(rows, list):
        raise DataFormatError(f"{source}: expected a JSON list of records")
    if not rows:
        raise DataFormatError(f"{source}: file has no records")
    return [parse_record(raw, dataset, source, index) for index, raw in enumerate(rows)]


def read_records(path: str | Path, dataset: str) -> list[CommonsenseExample]:
    """An LLM-Adapters JSON list (or JSONL) file of ``dataset`` (a set name or
    :data:`TRAIN_FILE_SET`), every record validated."""
    return parse_rows(read_json_rows(path), dataset, str(path))


def per_dataset(metrics: dict[str, float], dataset: str) -> dict[str, float]:
    """An item of a named set also feeds ``<metric>/<set>``."""
    return {**metrics, **{f"{name}/{dataset}": value for name, value in metrics.items()}}


@dataclass(kw_only=True)
class CommonsenseChoiceItem(ChoiceItem):
    """A commonsense question under the ``loglik`` protocol: each offered label's target text."""

    dataset: str
    labels: list[int]

    def metrics(self, scores: torch.Tensor) -> dict[str, float]:
        return per_dataset({"accuracy": accuracy_score(scores, torch.tensor(self.labels))}, self.dataset)


@dataclass(kw_only=True)
class CommonsenseGenerationItem(GenerationItem):
    """A commonsense question under the ``generate`` protocol, graded as LLM-Adapters grades it."""

    dataset: str
    answer: str

    def grade(self, text: str) -> tuple[str | None, dict[str, float]]:

        label = extract_answer(self.dataset, text)
        return label, per_dataset({"accuracy": float(label == self.answer)}, self.dataset)

    def record_fields(self, choices: dict[str, str | None]) -> dict[str, Any]:
        return {"dataset": self.dataset, "answer": self.answer, "choice": choices}


class CommonsenseDataModule(TaskDataModule):
    """LLM-Adapters' commonsense sets from a local folder or the hub.

    Test data: ``<set>/test.json`` of each set in ``datasets``. Warm-start data: ``train_file``
    (e.g. LLM-Adapters' ``commonsense_170k.json``), else the concatenation of the sets'
    ``<set>/train.json`` that exist. Files come from ``data_dir`` when it is set, else from the
    hub dataset ``hub_id``. Relative paths resolve against the working directory.
    The loss, and the steering calibration, are on the response tokens (``output`` + EOS).
    """

    task_name = "commonsense"
    task_metrics = ("accuracy",)

    def __init__(
        self,
        tokenizer: str = "svdecode-tiny",
        datasets: list[str] | None = None,
        data_dir: str | None = None,
        train_file: str | None = None,
        hub_id: str | None = None,
        protocol: Protocol = "loglik",
        max_new_tokens: int = 32,
        limit_train: int | None = None,
        limit_test: int | None = None,
        val_size: int = 0,
        seed: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or path (linked to ``--model.name_or_path`` by the CLI).
            datasets: Sets to evaluate, LLM-Adapters' names: ``boolq``, ``piqa``, ``social_i_qa``,
                ``hellaswag``, ``winogrande``, ``ARC-Challenge``, ``ARC-Easy``, ``openbookqa``
                (also ``siqa``, ``arc_easy``, ``obqa``, ...). Default: all eight.
            data_dir: Local folder with ``<set>/test.json`` (and ``<set>/train.json``), relative
                to the working directory; takes precedence over ``hub_id``.
            train_file: Warm-start JSON, a local path or a file of the ``hub_id`` repository
                (e.g. ``commonsense_170k.json``); default: every ``<set>/train.json`` present.
            hub_id: Hub dataset repository laid out like ``data_dir``, used when ``data_dir`` is unset.
            protocol: ``loglik``: rank the labels' continuations by log-likelihood; ``generate``:
                greedy decoding and LLM-Adapters' answer extraction.
            max_new_tokens: Tokens generated per question (``generate``).
            limit_train: Use a seeded random subset of this many warm-start examples.
            limit_test: Use the first ``limit_test`` questions of each set.
            val_size: Warm-start examples held out as the ``validation`` split (validation loss,
                or steering calibration with ``calibration: validation``).
            seed: Seed of the warm-start subset, the held-out split and the shuffle (None: 0); also the
                warm-start order's seed
                (None: the global seed of ``--seed_everything``, so seeds vary the order).
            batch_size: Warm-start and calibration batch size (sequences).
            eval_batch_size: Test and predict batch size (questions).
            num_workers: DataLoader workers.
        """
        super().__init__()
        check_task_values(locals())
        if data_dir is None and hub_id is None:
            raise OptionError(
                "--data.data_dir, --data.hub_id: set data_dir (a local folder of <set>/test.json) or hub_id")
        if protocol not in ("generate", "loglik"):
            raise OptionError(f"--data.protocol: must be 'generate' or 'loglik', got {protocol!r}")
        names = [canonical_dataset(name) for name in (datasets or list(DATASET_LABELS))]
        if len(set(names)) != len(names):
            raise OptionError(f"--data.datasets: a set is listed twice in {datasets}")
        if max_new_tokens < 1:
            raise OptionError(f"--data.max_new_tokens: must be >= 1, got {max_new_tokens}")
        self.save_hyperparameters()
        self.dataset_names = names

    @property
    def source(self) -> str:
        hp = self.hparams
        where = hp.data_dir if hp.data_dir is not None else f"hub:{hp.hub_id}"
        return f"{where} [{', '.join(self.dataset_names)}] ({hp.protocol})"

    @property
    def metric_names(self) -> list[str]:
        """What results.json reports: the accuracy over all questions, then per set."""
        return ["accuracy", *(f"accuracy/{name}" for name in self.dataset_names)]

    # -- reading --------------------------------------------------------------------------

    def _local(self, relative: str) -> Path | None:
        return None if self.hparams.data_dir is None else Path(self.hparams.data_dir) / relative

    def _read(self, relative: str, dataset: str) -> list[CommonsenseExample]:
        """``<data_dir>/<relative>``, or that file of the hub repository."""
        local = self._local(relative)
        if local is not None:
            return read_records(local, dataset)
        return self._read_hub(relative, dataset)

    def _read_hub(self, relative: str, dataset: str) -> list[CommonsenseExample]:
        import datasets

        hub_id = self.hparams.hub_id
        rows = datasets.load_dataset(hub_id, data_files={"data": relative}, split="data")
        return parse_rows([dict(row) for row in rows], dataset, f"{hub_id}/{relative}")

    def _train_pool(self) -> list[CommonsenseExample]:
        hp = self.hparams
        if hp.train_file is not None:
            if Path(hp.train_file).is_file() or hp.hub_id is None:
                return read_records(hp.train_file, TRAIN_FILE_SET)
            return self._read_hub(hp.train_file, TRAIN_FILE_SET)
        examples, missing = [], []
        for name in self.dataset_names:
            local = self._local(f"{name}/train.json")
            try:
                if local is not None and not local.exists():
                    raise FileNotFoundError(local)
                examples += self._read(f"{name}/train.json", name)
            except FileNotFoundError:  # (the hub's loader raises it too for a missing file)
                missing.append(name)
        if missing:
            rank_zero_info(f"commonsense: no train.json for {', '.join(missing)}; warm-start without them")
        if not examples:
            raise FileNotFoundError(
                f"{hp.data_dir or hp.hub_id}: none of the sets {self.dataset_names} has a train.json; set train_file"
            )
        return examples

    def _load_train_splits(self) -> None:
        hp = self.hparams
        pool = self._train_pool()
        order = list(range(len(pool)))
        random.Random(self.split_seed).shuffle(order)
        if hp.val_size >= len(order):
            raise OptionError(f"--data.val_size {hp.val_size} leaves no warm-start examples out of {len(order)}")
        held_out = sorted(order[: hp.val_size])
        rest = order[hp.val_size :]
        if hp.limit_train is not None:
            rest = rest[: hp.limit_train]
        self.splits["validation"] = [pool[i] for i in held_out]
        self.splits["train"] = [pool[i] for i in sorted(rest)]

    def _load_test_split(self) -> None:
        examples = []
        for name in self.dataset_names:
            rows = self._read(f"{name}/test.json", name)
            examples += rows[: self.hparams.limit_test] if self.hparams.limit_test is not None else rows
        self.splits["test"] = examples

    def load_split(self, name: Split) -> list[CommonsenseExample]:
        """The splits are read when first used (a test run never reads the warm-start files, a fit
        run never the test files)."""
        if name == "test":
            self._load_test_split()
        else:
            self._load_train_splits()
        return self.splits[name]

    # -- encodings ------------------------------------------------------------------------

    def lm_example(self, example: CommonsenseExample) -> LMExample:
        """Prompt + ``output`` + EOS, the loss (and the calibration) on the response tokens only,
        as LLM-Adapters' fine-tuning (``train_on_inputs=False``)."""
        context, target = encode_prompt_target(self.tokenizer, example.prompt, example.output)
        eos = self.tokenizer.eos_token_id
        if eos is not None and target[-1:] != [eos]:
            target = [*target, eos]
        return LMExample(context + target, len(context))

    def eval_item(self, example: CommonsenseExample, uid: int) -> EvalItem:
        """The evaluation item of a test question under the data module's protocol."""
        common = {"uid": uid, "id": f"{example.dataset}/{example.index}", "dataset": example.dataset}
        if self.hparams.protocol == "generate":
            return CommonsenseGenerationItem(
                **common,
                answer=example.answer,
                context_ids=self.tokenizer(example.prompt)["input_ids"],
                max_new_tokens=self.hparams.max_new_tokens,
            )
        context, continuations = None, []
        for label in example.options:
            context, continuation = encode_prompt_target(self.tokenizer, example.prompt, target_text(label))
            continuations.append(continuation)
        return CommonsenseChoiceItem(
            **common,
            answers=list(example.options),
            context_ids=context,
            continuation_ids=continuations,
            labels=[int(label == example.answer) for label in example.options],
        )

    def generation_settings(self) -> GenerationSettings:
        """Greedy decoding, no stop string (LLM-Adapters'); each item carries the task's
        ``max_new_tokens`` (as an lm-eval request carries its generation arguments)."""
        return GenerationSettings(stop=[])

    def val_dataloader(self):
        return self.lm_dataloader("validation") if self.hparams.val_size > 0 else []
