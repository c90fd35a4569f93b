"""TruthfulQA multiple choice as a task data module: warm-start split, calibration, test."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdecode_pl.corpus.primer import QA_PRIMER, mc_prompt
from svdecode_pl.corpus.questions import MCQuestion
from svdecode_pl.corpus.synthetic import synthetic_questions, synthetic_source
from svdecode_pl.corpus.worlds import DEFAULT_WORLD, world_named
from svdecode_pl.evaluation.items import ChoiceItem
from svdecode_pl.metrics.choice import mc1_score, mc2_score, mc3_score
from svdecode_pl.scoring.encoding import encode_pair, encode_pairs
from svdecode_pl.steering.strength import SelectionMetric
from svdecode_pl.tasks.base import (
    LMExample,
    Split,
    TaskDataModule,
    check_task_values,
    collate_items,
    collate_lm,
    lm_loader,
    mark_shared_prefix,
    seeded_splits,
)
from svdecode_pl.tasks.readers import from_json_record, read_mc_file
from svdecode_pl.utils.errors import DataFormatError

__all__ = ["TruthfulQADataModule", "collate_items", "collate_lm", "encode_pair", "encode_pairs", "lm_loader",
           "mark_shared_prefix"]


#: how MC tasks choose a strength: mean(MC1, MC2) per question, none of MC1/MC2/MC3 falling significantly
MC_SELECTION = SelectionMetric(("mc1", "mc2"), ("mc1", "mc2", "mc3"))


@dataclass(kw_only=True)
class TruthfulQAMCItem(ChoiceItem):
    """A TruthfulQA MC question: every distinct answer scored once, indexed into MC1 and MC2."""

    question: str
    mc1_index: list[int]
    mc1_labels: list[int]
    mc2_index: list[int]
    mc2_labels: list[int]

    def metrics(self, scores: torch.Tensor) -> dict[str, float]:
        mc1 = scores[self.mc1_index], torch.tensor(self.mc1_labels)
        mc2 = scores[self.mc2_index], torch.tensor(self.mc2_labels)
        return {"mc1": mc1_score(*mc1), "mc2": mc2_score(*mc2), "mc3": mc3_score(*mc2)}

    def choice(self, scores: torch.Tensor) -> str:
        """The answer picked among the MC1 set."""
        return self.answers[self.mc1_index[int(scores[self.mc1_index].argmax())]]


class TruthfulQADataModule(TaskDataModule):
    """TruthfulQA MC from the hub, a local file, or a task generated in code.

    Source, in this order: ``path`` (mc_task.json, hub-form JSON/JSONL or TruthfulQA.csv),
    else ``synthetic_questions`` > 0 (the embedded default task), else the hub dataset.
    A seeded shuffle of the questions gives the warm-start split (``train_fraction``), an
    optional held-out ``validation`` split (``val_fraction``) and the test split (the rest).
    """

    task_name = "truthfulqa_mc"
    task_metrics = ("mc1", "mc2", "mc3")
    #: mean(MC1, MC2) per question: MC2 (the mass on the true answers) is continuous, so a small
    #: validation split still ranks neighbouring strengths; alone it let MC1 fall (a strength that
    #: spreads mass onto the true answers while the top answer turns false), so MC1 counts as much
    selection = MC_SELECTION

    def __init__(
        self,
        tokenizer: str = "svdecode-tiny",
        path: str | None = None,
        synthetic_questions: int = 0,
        world: str = DEFAULT_WORLD,
        hub_id: str = "truthfulqa/truthful_qa",
        hub_config: str = "multiple_choice",
        hub_split: str = "validation",
        train_fraction: float = 0.5,
        val_fraction: float = 0.0,
        seed: int | None = None,
        primer: bool = True,
        limit: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or path (linked to ``--model.name_or_path`` by the CLI).
            path: Local TruthfulQA MC file; overrides the generated task and the hub.
            synthetic_questions: Number of generated questions (the embedded default task).
            world: The generated task's world (``svdecode_pl.corpus.worlds``: superstitions, gadgets, garden,
                kitchen, sports, school; each miniature of ``svdecode_pl.models.family`` is pre-trained on one, see
                configs/family/).
            hub_id: Hub dataset id, used when neither ``path`` nor the generated task is set.
            hub_config: Hub dataset configuration.
            hub_split: Hub dataset split.
            train_fraction: Share of the questions that warm-start the adapter (0: all test).
            val_fraction: Share held out for calibration or validation (``calibration: validation``).
            seed: Seed of the question shuffle that makes the splits (None: 0); also the warm-start order's seed
                (None: the global seed of ``--seed_everything``, so seeds vary the order).
            primer: Put the six-pair QA primer of the MC protocol before each question.
            limit: Use only the first ``limit`` questions (after loading, before splitting).
            batch_size: Warm-start and calibration batch size (sequences).
            eval_batch_size: Test and predict batch size (questions; each question is scored as one
                row with all its answers packed after it).
            num_workers: DataLoader workers.
        """
        super().__init__()
        check_task_values(locals())
        world_named(world)
        self.save_hyperparameters()

    @property
    def source(self) -> str:
        hp = self.hparams
        if hp.path:
            return str(hp.path)
        if hp.synthetic_questions:
            return synthetic_source(hp.synthetic_questions, self.split_seed, hp.world)
        return hp.hub_id

    def load_questions(self) -> list[MCQuestion]:
        hp = self.hparams
        if hp.path:
            questions = read_mc_file(hp.path)
        elif hp.synthetic_questions:
            questions = synthetic_questions(hp.synthetic_questions, self.split_seed, world_named(hp.world))
        else:
            import datasets

            rows = datasets.load_dataset(hp.hub_id, hp.hub_config, split=hp.hub_split)
            questions = [from_json_record(dict(row), f"{hp.hub_id}[{hp.hub_split}]", i) for i, row in enumerate(rows)]
        if hp.limit is not None:
            questions = questions[: hp.limit]
        if not questions:
            raise DataFormatError(f"{self.source}: no questions")
        return questions

    def setup(self, stage: str | None = None) -> None:
        """Reads and splits the questions (errors in the data surface here, on every stage)."""
        super().setup(stage)
        for name in ("train", "validation", "test"):
            self.split(name)

    def load_split(self, name: Split) -> list[MCQuestion]:
        """A seeded shuffle of all questions cut into train / validation / test (file order within each)."""
        if not hasattr(self, "_all_splits"):
            questions = self.load_questions()
            for index, question in enumerate(questions):
                question.extra["index"] = index
            hp = self.hparams
            self._all_splits = seeded_splits(questions, self.split_seed, hp.train_fraction, hp.val_fraction)
        return self._all_splits[name]

    def eval_groups(self, split: Split = "test") -> list[str]:
        """TruthfulQA categories (present in TruthfulQA.csv and the hub's generation config)."""
        return sorted({q.extra["Category"] for q in self.split(split) if q.extra.get("Category")})

    # -- encodings ------------------------------------------------------------------------

    def prompt(self, question: MCQuestion) -> str:
        return mc_prompt(question.question, QA_PRIMER if self.hparams.primer else None)

    def lm_example(self, question: MCQuestion) -> LMExample:
        """Prompt + best answer, the loss (and the calibration) on the answer tokens only."""
        context, target = encode_pair(self.tokenizer, self.prompt(question), " " + question.best_answer)
        return LMExample(context + target, len(context))

    def eval_item(self, question: MCQuestion, uid: int | None = None) -> TruthfulQAMCItem:
        """One question with its shared context and every distinct answer's continuation. The
        ``uid`` is the question's position in the file, so records of any split keep file order."""
        return mc_item(self.tokenizer, self.prompt(question), question, question.extra["index"],
                       question.extra.get("Category"))


def mc_item(tokenizer, prompt: str, question: MCQuestion, uid: int, group: str | None) -> TruthfulQAMCItem:
    """A question's MC item: ``prompt`` as the shared context, each distinct answer's continuation
    ``" " + answer`` scored once and indexed into the MC1 and MC2 sets."""
    answers = question.answers
    context, continuations = encode_pairs(tokenizer, prompt, [" " + a for a in answers])
    index = {a: i for i, a in enumerate(answers)}
    return TruthfulQAMCItem(
        uid=uid,
        id=question.id,
        group=group,
        question=question.question,
        answers=answers,
        context_ids=context,
        continuation_ids=continuations,
        mc1_index=[index[a] for a in question.mc1_choices],
        mc1_labels=question.mc1_labels,
        mc2_index=[index[a] for a in question.mc2_choices],
        mc2_labels=question.mc2_labels,
    )
