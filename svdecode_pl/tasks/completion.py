"""Any prompt/completion task as a task data module: warm-start with the loss on the completion,
evaluate by generation (exact match, optionally BLEU/ROUGE against the completion).

Records are JSONL (or a JSON list) of ``{"prompt": ..., "completion": ...}`` with an optional
``id`` and ``category``. This is also the recipe to train TruthfulQA's truth/info judges with this
very system: their data (``finetune_truth.jsonl``, ``finetune_info.jsonl``) has this form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.items import GenerationItem
from svdecode_pl.scoring.encoding import encode_prompt_target
from svdecode_pl.tasks.base import LMExample, Split, TaskDataModule, check_task_values, seeded_splits
from svdecode_pl.tasks.readers import read_json_rows
from svdecode_pl.utils.errors import DataFormatError


@dataclass
class PromptCompletion:
    id: str
    index: int
    prompt: str
    completion: str
    category: str | None = None


def parse_completion_record(raw: Any, source: str, index: int) -> PromptCompletion:
    if not isinstance(raw, dict):
        raise DataFormatError(f"{source}: record {index}: expected a JSON object, got {type(raw).__name__}")
    for name in ("prompt", "completion"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if name not in raw else "empty" if isinstance(value, str) else (
                f"expected a string, got {type(value).__name__}")
            raise DataFormatError(f"{source}: record {index}: field {name!r}: {problem}")
    category = raw.get("category")
    if category is not None and not isinstance(category, str):
        raise DataFormatError(f"{source}: record {index}: field 'category': expected a string")
    return PromptCompletion(str(raw.get("id", index)), index, raw["prompt"], raw["completion"], category)


def read_completion_file(path: str | Path) -> list[PromptCompletion]:
    rows = read_json_rows(path)
    if not rows:
        raise DataFormatError(f"{path}: file has no records")
    return [parse_completion_record(raw, str(path), index) for index, raw in enumerate(rows)]


@dataclass(kw_only=True)
class CompletionItem(GenerationItem):
    """A prompt/completion pair of a user's task, graded by exact match (and BLEU/ROUGE against
    the one reference when the data module asks for them)."""

    target: str
    text_metrics: bool = False

    def grade(self, text: str) -> tuple[str | None, dict[str, float]]:
        from svdecode_pl.metrics.text import exact_match, reference_scores

        metrics = {"exact_match": exact_match(text, self.target)}
        if self.text_metrics:
            metrics.update(reference_scores(text, self.target))
        return None, metrics


class PromptCompletionDataModule(TaskDataModule):
    """A user's task given as prompt/completion pairs.

    ``path`` is split by a seeded shuffle into warm-start, validation and test (``train_fraction``,
    ``val_fraction``), unless ``test_path`` gives the test records (then ``path`` is warm-start and
    validation only). The completion is the target as it follows the prompt (split off the joint
    encoding, as lm-eval splits continuations), with EOS appended when ``append_eos``.
    """

    task_name = "prompt_completion"
    task_metrics = ("exact_match",)

    def __init__(
        self,
        tokenizer: str = "svdecode-tiny",
        path: str = "data.jsonl",
        test_path: str | None = None,
        train_fraction: float = 0.8,
        val_fraction: float = 0.0,
        seed: int | None = None,
        limit: int | None = None,
        append_eos: bool = True,
        text_metrics: bool = False,
        generation: GenerationSettings | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or path (linked to ``--model.name_or_path`` by the CLI).
            path: JSONL/JSON of ``{"prompt", "completion"}`` records.
            test_path: Separate test records (default: a share of ``path``).
            train_fraction: Share of ``path`` that warm-starts the adapter (the rest, minus
                ``val_fraction``, is the test split unless ``test_path`` is set).
            val_fraction: Share of ``path`` held out for calibration or validation.
            seed: Seed of the shuffle that makes the splits (None: 0); also the warm-start order's seed
                (None: the global seed of ``--seed_everything``, so seeds vary the order).
            limit: Use only the first ``limit`` records of each file.
            append_eos: End each warm-start target with EOS, so the model learns to stop.
            text_metrics: Also report BLEU and ROUGE-1/2/L against the completion.
            generation: Decoding settings (default: greedy, 64 new tokens, stop at a newline).
            batch_size: Warm-start and calibration batch size (sequences).
            eval_batch_size: Prompts decoded per batch.
            num_workers: DataLoader workers.
        """
        super().__init__()
        check_task_values(locals())
        self.save_hyperparameters()
        self.generation = generation or GenerationSettings(max_new_tokens=64, stop=["\n"])

    @property
    def source(self) -> str:
        hp = self.hparams
        return str(hp.path) if hp.test_path is None else f"{hp.path} + {hp.test_path}"

    @property
    def metric_names(self) -> list[str]:
        extra = ("bleu", "rouge1", "rouge2", "rougeL") if self.hparams.text_metrics else ()
        return [*self.task_metrics, *extra]

    def _read(self, path: str) -> list[PromptCompletion]:
        records = read_completion_file(path)
        return records[: self.hparams.limit] if self.hparams.limit is not None else records

    def load_split(self, name: Split) -> list[PromptCompletion]:
        hp = self.hparams
        if not hasattr(self, "_all_splits"):
            if hp.test_path is None:
                records = self._read(hp.path)
                self._all_splits = seeded_splits(records, self.split_seed, hp.train_fraction, hp.val_fraction)
            else:
                records = self._read(hp.path)
                share = hp.val_fraction / max(hp.train_fraction + hp.val_fraction, 1e-9)
                splits = seeded_splits(records, self.split_seed, 1.0 - share, share)
                self._all_splits = {"train": splits["train"], "validation": splits["validation"]}
        if name == "test" and hp.test_path is not None:
            return self._read(hp.test_path)
        return self._all_splits[name]

    def generation_settings(self) -> GenerationSettings:
        return self.generation

    def lm_example(self, record: PromptCompletion) -> LMExample:
        context, target = encode_prompt_target(self.tokenizer, record.prompt, record.completion)
        eos = self.tokenizer.eos_token_id
        if self.hparams.append_eos and eos is not None and target[-1:] != [eos]:
            target = [*target, eos]
        return LMExample(context + target, len(context))

    def eval_item(self, record: PromptCompletion, uid: int) -> CompletionItem:
        return CompletionItem(uid=uid, id=record.id, group=record.category,
                              context_ids=self.tokenizer(record.prompt)["input_ids"], target=record.completion,
                              text_metrics=self.hparams.text_metrics)
