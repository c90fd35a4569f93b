"""The declared interface of every task's data module, and what the task modules share.

:class:`TaskDataModule` is what the LightningModule, the steering callback, the results and the
CLI rely on: a task name, the metric names it reports, where its data came from, the
prompt+target loader of warm-start and calibration, the loader of evaluation items
(:mod:`svdecode_pl.evaluation.items`), and the task's part of the evaluation settings (how its
generation items decode, which judges score them). A new task subclasses it and implements
:attr:`source`, :meth:`load_split`, :meth:`lm_example` and :meth:`eval_item`; the CLI accepts any
subclass as ``data.class_path``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler

from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.items import ChoiceItem, EvalItem
from svdecode_pl.evaluation.judges import JudgeSettings
from svdecode_pl.models.loading import load_tokenizer, resolve_name_or_path
from svdecode_pl.steering.strength import SelectionMetric
from svdecode_pl.tasks.context import fit_examples_to_context, fit_items_to_context, model_context_limit
from svdecode_pl.tasks.resumable import ResumableDataLoader
from svdecode_pl.utils.errors import DataFormatError, OptionError
from svdecode_pl.utils.seeding import run_seed
from svdecode_pl.utils.validation import COUNT, POSITIVE_INT, UNIT_INTERVAL, check_values

#: the rules of the task data modules' numeric options (one name, one rule, whichever task has it)
TASK_RULES = {"batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT, "num_workers": COUNT,
              "synthetic_questions": COUNT, "limit": POSITIVE_INT.or_none(), "limit_train": POSITIVE_INT.or_none(),
              "limit_test": POSITIVE_INT.or_none(), "val_size": COUNT, "max_new_tokens": POSITIVE_INT,
              "train_fraction": UNIT_INTERVAL, "val_fraction": UNIT_INTERVAL}


def check_task_values(arguments: dict[str, Any]) -> None:
    """A data module's ``__init__`` arguments (its ``locals()``) that have a rule in :data:`TASK_RULES`."""
    check_values("--data.", {k: v for k, v in arguments.items() if k in TASK_RULES}, TASK_RULES)
    train, val = arguments.get("train_fraction"), arguments.get("val_fraction")
    if train is not None and val is not None and train + val > 1.0 + 1e-9:  # (0.8 + 0.2 is 1: no rounding refusal)
        raise OptionError(f"--data.train_fraction {train}, --data.val_fraction {val}: need "
                          "0 <= train_fraction <= 1 and 0 <= val_fraction <= 1 - train_fraction")

Split = Literal["train", "validation", "test"]


@dataclass
class LMExample:
    """A prompt+target token sequence; the loss (and the calibration) is on the target tokens."""

    input_ids: list[int]
    num_context: int
    padding: bool = False
    """A copy that evens out the shards of a sharded loader; its tokens count for nothing."""


def seeded_splits(items: Sequence[Any], seed: int, train_fraction: float, val_fraction: float) -> dict[str, list]:
    """A seeded shuffle cut into train / validation / test, each kept in file order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_train = round(train_fraction * len(order))
    n_val = round(val_fraction * len(order))
    pick = lambda idx: [items[i] for i in sorted(idx)]  # noqa: E731
    return {
        "train": pick(order[:n_train]),
        "validation": pick(order[n_train : n_train + n_val]),
        "test": pick(order[n_train + n_val :]),
    }


def collate_lm(batch: list[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+target sequences; ``target_mask`` marks the tokens the loss is on."""
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    target_mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        if not example.padding:
            target_mask[row, example.num_context : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def lm_loader(
    examples: list[LMExample], batch_size: int, pad_id: int, seed: int, shuffle: bool = False, rank: int = 0,
    world_size: int = 1, num_workers: int = 0,
) -> DataLoader:
    """Loader of prompt+target sequences for warm-start and steering calibration.

    ``shuffle``: a DistributedSampler seeded by ``seed`` (the order depends on seed and epoch
    only, so a resumed run sees the batches an uninterrupted one would, also from the middle of
    an epoch: a ``ResumableDataLoader``). Otherwise, with
    ``world_size`` > 1, the ``rank``-th shard; every shard has the same length (ranks of a sharded
    model must run the same number of forward passes), the shortest padded with copies flagged
    ``padding`` whose tokens count for nothing.
    """
    sampler = None
    if shuffle:
        sampler = DistributedSampler(examples, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif world_size > 1:
        per_rank = -(-len(examples) // world_size)
        shard = examples[rank::world_size]
        pad = LMExample(examples[0].input_ids, examples[0].num_context, padding=True)
        examples = shard + [pad] * (per_rank - len(shard))
    return ResumableDataLoader(examples, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                               collate_fn=functools.partial(collate_lm, pad_id=pad_id))


def mark_shared_prefix(items: list[EvalItem], min_tokens: int = 8) -> list[EvalItem]:
    """Store in each choice item how many leading context tokens all items share (the primer), so
    scoring encodes them once. Computed over the whole split, so every process agrees."""
    if len(items) < 2 or not all(isinstance(item, ChoiceItem) for item in items):
        return items
    first = items[0].context_ids
    shared = len(first)
    for item in items[1:]:
        ids = item.context_ids
        limit = min(shared, len(ids))
        shared = next((i for i in range(limit) if ids[i] != first[i]), limit)
    for item in items:
        item.shared_prefix_len = shared if shared >= min_tokens else 0
    return items


def collate_items(batch: list[EvalItem]) -> list[EvalItem]:
    """Evaluation items stay a list: each is scored or decoded with its own context."""
    return batch


class TaskDataModule(LightningDataModule):
    """A task's data: warm-start and calibration sequences, evaluation items, and what is reported.

    Subclasses set :attr:`task_name`, store ``tokenizer``, ``batch_size``, ``eval_batch_size``,
    ``seed`` and ``num_workers`` in their hyperparameters (``save_hyperparameters``), and implement
    :meth:`load_split`, :meth:`lm_example` and :meth:`eval_item`.
    """

    #: the task's name in results.json and reports
    task_name: str = "task"
    #: the metrics every item of the task feeds, in report order
    task_metrics: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = None
        self.splits: dict[str, list] = {}

    # -- what a task declares -----------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        """What results.json reports, in order."""
        return list(self.task_metrics)

    @property
    def selection(self) -> SelectionMetric:
        """What chooses a strength on the validation split (:mod:`svdecode_pl.steering.strength`):
        by default the first metric, with every reported metric guarded (none may fall on validation)."""
        return SelectionMetric((self.metric_names[0],), tuple(self.metric_names))

    def selection_items(self, split: Split = "validation") -> list[EvalItem]:
        """The items the validation pass scores (default: the split's evaluation items)."""
        return self.eval_items(split)

    @property
    def source(self) -> str:
        """Where the data came from (a path, a hub id, a generated task), for results.json."""
        raise NotImplementedError

    def load_split(self, name: Split) -> list:
        """The examples of a split (read on first use)."""
        raise NotImplementedError

    def lm_example(self, example: Any) -> LMExample:
        """An example as a prompt+target sequence (warm-start and calibration)."""
        raise NotImplementedError

    def eval_item(self, example: Any, uid: int) -> EvalItem:
        """An example as an evaluation item (test and predict)."""
        raise NotImplementedError

    def eval_groups(self, split: Split = "test") -> list[str]:
        """The groups (e.g. TruthfulQA categories) a split's items belong to, reported one by one
        in results.json; the same list on every process. Default: the examples' ``category``
        attribute, where they have one."""
        return sorted({c for example in self.split(split) if (c := getattr(example, "category", None))})

    def generation_settings(self) -> GenerationSettings | None:
        """How the task's generation items are decoded; None for a task without generation items."""
        return None

    def judge_settings(self) -> JudgeSettings | None:
        """The judges that score the task's generated answers in the evaluation stage (default none)."""
        return None

    # -- shared machinery ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Runs once per node before ``setup``: builds a built-in tiny model if needed."""
        resolve_name_or_path(self.hparams.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer)

    @property
    def split_seed(self) -> int:
        """The seed of the splits (and generated questions): ``seed``, or 0 when unset, so the test
        split stays the same while ``--seed_everything`` varies the warm-start order."""
        return 0 if self.hparams.seed is None else int(self.hparams.seed)

    def split(self, name: Split) -> list:
        if self.tokenizer is None:
            TaskDataModule.setup(self)
        if name not in self.splits:
            self.splits[name] = self.load_split(name)
        return self.splits[name]

    def lm_dataloader(self, split: Split, shuffle: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Prompt+target sequences of a split, for warm-start and steering calibration (the
        ``rank``-th of ``world_size`` equal shards, see :func:`lm_loader`)."""
        self.require_examples(split)
        examples = fit_examples_to_context([self.lm_example(example) for example in self.split(split)],
                                           self.context_limit(), f"{self.source}: {split} split")
        hp = self.hparams
        pad = self.tokenizer.pad_token_id
        return lm_loader(examples, hp.batch_size, pad, run_seed(hp.seed), shuffle, rank, world_size, hp.num_workers)

    def eval_items(self, split: Split = "test") -> list[EvalItem]:
        """Every example of a split as an evaluation item, in split order (``uid`` = position); prompts
        beyond the model's context cut from the left (:func:`fit_items_to_context`)."""
        items = [self.eval_item(example, uid) for uid, example in enumerate(self.split(split))]
        settings = self.generation_settings()
        new_tokens = settings.max_new_tokens if settings is not None else 0
        return mark_shared_prefix(fit_items_to_context(items, self.context_limit(), new_tokens,
                                                       f"{self.source}: {split} split"))

    def context_limit(self) -> int | None:
        """The most tokens the model reads at once (its config's ``max_position_embeddings``)."""
        return model_context_limit(self.hparams.tokenizer)

    def require_examples(self, split: Split) -> None:
        """An empty split is an error naming it and the splits' sizes (never a run that scores nothing)."""
        if self.split(split):
            return
        sizes = ", ".join(f"{name} {len(self.split(name))}" for name in ("train", "validation", "test"))
        raise DataFormatError(f"{self.source}: split {split!r} is empty ({sizes} examples); check "
                              "--data.train_fraction / --data.val_fraction / --data.limit and the data file")

    def scoring_dataloader(self, split: Split = "test") -> DataLoader:
        self.require_examples(split)
        return DataLoader(self.eval_items(split), batch_size=self.hparams.eval_batch_size,
                          num_workers=self.hparams.num_workers, collate_fn=collate_items)

    def selection_dataloader(self, split: Split = "validation") -> DataLoader:
        """The validation pass's items (:meth:`selection_items`), every process the whole split."""
        return DataLoader(self.selection_items(split), batch_size=self.hparams.eval_batch_size,
                          num_workers=self.hparams.num_workers, collate_fn=collate_items)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return self.lm_dataloader("train", shuffle=True, rank=rank, world_size=world)

    def val_dataloader(self) -> DataLoader | list:
        return self.lm_dataloader("validation") if self.split("validation") else []

    def test_dataloader(self) -> DataLoader:
        return self.scoring_dataloader("test")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Evaluation items hold token ids as lists (scoring builds its tensors on the model's
        device): Lightning's walk through every field and list of a batch cost 2 s per TruthfulQA
        run for nothing."""
        if isinstance(batch, list) and all(isinstance(item, EvalItem) for item in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def predict_dataloader(self) -> DataLoader:
        return self.scoring_dataloader("test")
