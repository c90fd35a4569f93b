"""TruthfulQA generation as a task data module: warm-start on the best answers, then decode each
test question (plain and steered) and score it as lm-evaluation-harness's ``truthfulqa_gen`` does
(BLEU/ROUGE against the true and false references), optionally with truth/info judges.

Sources: ``TruthfulQA.csv``, the hub's ``truthful_qa`` ``generation`` config (or its JSON/JSONL
export: ``question``, ``best_answer``, ``correct_answers``, ``incorrect_answers``, ``category``),
or a generated TruthfulQA-like task (the embedded default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from svdecode_pl.corpus.primer import QA_PRIMER, truthfulqa_gen_prompt
from svdecode_pl.corpus.questions import MCQuestion
from svdecode_pl.corpus.synthetic import synthetic_questions, synthetic_source
from svdecode_pl.corpus.worlds import DEFAULT_WORLD, world_named
from svdecode_pl.decoding.settings import GenerationSettings
from svdecode_pl.evaluation.items import EvalItem, GenerationItem
from svdecode_pl.evaluation.judges import JudgeSettings
from svdecode_pl.metrics.text import TRUTHFULQA_GEN_KEYS, split_answer_cell, truthfulqa_gen_references
from svdecode_pl.scoring.encoding import encode_prompt_target
from svdecode_pl.steering.strength import SelectionMetric
from svdecode_pl.tasks.base import (
    LMExample,
    Split,
    TaskDataModule,
    check_task_values,
    mark_shared_prefix,
    seeded_splits,
)
from svdecode_pl.tasks.readers import read_by_suffix, read_csv_rows, read_json_rows
from svdecode_pl.tasks.truthfulqa_mc import MC_SELECTION, mc_item
from svdecode_pl.utils.errors import DataFormatError


@dataclass
class GenerationQuestion:
    """A TruthfulQA question with its reference answers."""

    id: str
    index: int
    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fail(source: str, index: int, name: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{source}: record {index}: field {name!r}: {problem}")


def _answers(value: Any, source: str, index: int, name: str) -> list[str]:
    answers = split_answer_cell(value) if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _fail(source, index, name, "expected a list of strings or a '; '-separated string")
    answers = [a.strip() for a in answers if a.strip()]
    if not answers:
        raise _fail(source, index, name, "no answers")
    return answers


def parse_generation_record(raw: Any, source: str, index: int) -> GenerationQuestion:
    """A record of the hub's ``generation`` form (snake_case keys) or a ``TruthfulQA.csv`` row."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{source}: record {index}: expected a JSON object, got {type(raw).__name__}")
    keys = {"question": "Question", "best_answer": "Best Answer", "correct_answers": "Correct Answers",
            "incorrect_answers": "Incorrect Answers", "category": "Category"}
    value = {k: raw.get(k, raw.get(csv_key)) for k, csv_key in keys.items()}
    for name in ("question", "best_answer"):
        if not isinstance(value[name], str) or not value[name].strip():
            raise _fail(source, index, name, "missing or empty" if not value[name] else "not a string")
    category = value["category"]
    if category is not None and not isinstance(category, str):
        raise _fail(source, index, "category", f"expected a string, got {type(category).__name__}")
    return GenerationQuestion(
        id=str(raw.get("id", index)),
        index=index,
        question=value["question"].strip(),
        best_answer=value["best_answer"].strip(),
        correct_answers=_answers(value["correct_answers"], source, index, "correct_answers"),
        incorrect_answers=_answers(value["incorrect_answers"], source, index, "incorrect_answers"),
        category=category or None,
    )


def read_generation_file(path: str | Path) -> list[GenerationQuestion]:
    """TruthfulQA generation questions from ``TruthfulQA.csv`` or a JSON/JSONL file of the hub's form."""
    rows = read_by_suffix(path, lambda csv: read_csv_rows(csv)[1], read_json_rows)
    return [parse_generation_record(row, str(path), index) for index, row in enumerate(rows)]


def reference_question(question: GenerationQuestion) -> MCQuestion:
    """The question's reference answers as TruthfulQA MC sets: MC1 = the best answer against the
    incorrect ones, MC2 = every correct answer against the incorrect ones (each answer once)."""
    correct = list(dict.fromkeys([question.best_answer, *question.correct_answers]))
    incorrect = [a for a in dict.fromkeys(question.incorrect_answers) if a not in correct]
    return MCQuestion(question.id, question.question, [question.best_answer, *incorrect], [1] + [0] * len(incorrect),
                      correct + incorrect, [1] * len(correct) + [0] * len(incorrect))


def synthetic_generation_questions(num_questions: int, seed: int = 0,
                                   world: str = DEFAULT_WORLD) -> list[GenerationQuestion]:
    """The embedded default task (:mod:`svdecode_pl.corpus.synthetic`, over ``world``) in the
    generation form; its two kinds of questions are its two categories."""
    questions, tables = [], world_named(world)
    for index, mc in enumerate(synthetic_questions(num_questions, seed, tables)):
        true = [a for a, label in zip(mc.mc2_choices, mc.mc2_labels) if label]
        false = [a for a, label in zip(mc.mc2_choices, mc.mc2_labels) if not label]
        category = tables.categories[index % 2]
        questions.append(GenerationQuestion(mc.id, index, mc.question, mc.best_answer, true, false, category))
    return questions


@dataclass(kw_only=True)
class TruthfulQAGenerationItem(GenerationItem):
    """A TruthfulQA question answered in free text, scored by BLEU/ROUGE against the true and false
    references as lm-eval's ``truthfulqa_gen`` scores it (judges add %Truth/%Info afterwards)."""

    question: str
    true_refs: list[str]
    false_refs: list[str]

    def grade(self, text: str) -> tuple[str | None, dict[str, float]]:
        from svdecode_pl.metrics.text import truthfulqa_gen_scores

        return None, truthfulqa_gen_scores(text, self.true_refs, self.false_refs)

    def record_fields(self, choices: dict[str, str | None]) -> dict[str, Any]:
        return {"question": self.question}


class TruthfulQAGenerationDataModule(TaskDataModule):
    """TruthfulQA generation: warm-start target ``"\\nA: " + best answer + "\\n\\n"`` after
    lm-eval's prompt (the primer, then ``\\n\\nQ: {question}``), so the model learns to answer in
    the primer's format and to stop; test: greedy decoding up to ``\\n\\n`` and lm-eval's
    BLEU/ROUGE, plus %Truth/%Info/%Truth*Info when ``judges`` are set.

    Source, in this order: ``path``, else ``synthetic_questions`` > 0, else the hub dataset. A
    seeded shuffle gives the warm-start, validation and test splits, as for TruthfulQA MC (with the
    same seed and fractions, the same questions land in the same split in both tasks).
    """

    task_name = "truthfulqa_gen"
    task_metrics = TRUTHFULQA_GEN_KEYS

    def __init__(
        self,
        tokenizer: str = "svdecode-tiny",
        path: str | None = None,
        synthetic_questions: int = 0,
        world: str = DEFAULT_WORLD,
        hub_id: str = "truthfulqa/truthful_qa",
        hub_config: str = "generation",
        hub_split: str = "validation",
        train_fraction: float = 0.5,
        val_fraction: float = 0.0,
        seed: int | None = None,
        limit: int | None = None,
        generation: GenerationSettings | None = None,
        judges: JudgeSettings | None = None,
        selection: Literal["references", "decoding"] = "references",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            tokenizer: Tokenizer name or path (linked to ``--model.name_or_path`` by the CLI).
            path: Local ``TruthfulQA.csv`` or JSON/JSONL of the hub's generation form.
            synthetic_questions: Number of generated questions (the embedded default task).
            world: The generated task's world (``svdecode_pl.corpus.worlds``: superstitions, gadgets, garden,
                kitchen, sports, school; each miniature of ``svdecode_pl.models.family`` is pre-trained on one, see
                configs/family/).
            hub_id: Hub dataset id, used when neither ``path`` nor the generated task is set.
            hub_config: Hub dataset configuration.
            hub_split: Hub dataset split.
            train_fraction: Share of the questions that warm-start the adapter (0: all test).
            val_fraction: Share held out for calibration or validation.
            seed: Seed of the question shuffle that makes the splits (None: 0); also the warm-start order's seed
                (None: the global seed of ``--seed_everything``, so seeds vary the order).
            limit: Use only the first ``limit`` questions (after loading, before splitting).
            generation: Decoding settings (default: lm-eval's, greedy, stop at ``\\n\\n``, 256 new tokens).
            judges: Truth/info judge models (default: none; BLEU/ROUGE only).
            selection: How the validation split chooses a strength: ``references``, one log-likelihood
                pass scoring each question's correct and incorrect reference answers as TruthfulQA MC
                does (mean(MC1, MC2), as the MC task), the chosen candidate then decoded once to check
                that no BLEU/ROUGE metric falls significantly; ``decoding``, one full decoding pass
                per candidate strength, graded by mean(BLEU acc, ROUGE-L acc) (about 40 decodings).
            batch_size: Warm-start and calibration batch size (sequences).
            eval_batch_size: Questions decoded per batch (left-padded).
            num_workers: DataLoader workers.
        """
        super().__init__()
        check_task_values(locals())
        world_named(world)
        self.save_hyperparameters()
        self.generation = generation or GenerationSettings()
        self.judges = judges

    @property
    def source(self) -> str:
        hp = self.hparams
        if hp.path:
            return str(hp.path)
        if hp.synthetic_questions:
            return synthetic_source(hp.synthetic_questions, self.split_seed, hp.world)
        return hp.hub_id

    @property
    def metric_names(self) -> list[str]:
        return [*self.task_metrics, *([] if self.judges is None else self.judges.metric_names())]

    def load_questions(self) -> list[GenerationQuestion]:
        hp = self.hparams
        if hp.path:
            questions = read_generation_file(hp.path)
        elif hp.synthetic_questions:
            questions = synthetic_generation_questions(hp.synthetic_questions, self.split_seed, hp.world)
        else:
            import datasets

            rows = datasets.load_dataset(hp.hub_id, hp.hub_config, split=hp.hub_split)
            source = f"{hp.hub_id}[{hp.hub_split}]"
            questions = [parse_generation_record(dict(row), source, i) for i, row in enumerate(rows)]
        if hp.limit is not None:
            questions = questions[: hp.limit]
        if not questions:
            raise DataFormatError(f"{self.source}: no questions")
        return questions

    def load_split(self, name: Split) -> list[GenerationQuestion]:
        if not hasattr(self, "_all_splits"):
            hp = self.hparams
            self._all_splits = seeded_splits(self.load_questions(), self.split_seed, hp.train_fraction, hp.val_fraction)
        return self._all_splits[name]

    @property
    def selection(self) -> SelectionMetric:
        if self.hparams.selection == "references":
            return SelectionMetric(MC_SELECTION.metrics, MC_SELECTION.guarded, "references")
        return SelectionMetric(("bleu_acc", "rougeL_acc"), tuple(self.metric_names), "decoding")

    def selection_items(self, split: Split = "validation") -> list[EvalItem]:
        """``references``: each question's reference answers as an MC item after the generation
        prompt and ``"\nA:"`` (the form the warm-start trained); ``decoding``: the generation items."""
        if self.hparams.selection != "references":
            return self.eval_items(split)
        return mark_shared_prefix([mc_item(self.tokenizer, self.prompt(q) + "\nA:", reference_question(q), q.index,
                                           q.category) for q in self.split(split)])

    def generation_settings(self) -> GenerationSettings:
        return self.generation

    # -- encodings ------------------------------------------------------------------------

    def prompt(self, question: GenerationQuestion) -> str:
        return truthfulqa_gen_prompt(question.question, QA_PRIMER)

    def lm_example(self, question: GenerationQuestion) -> LMExample:
        target = f"\nA: {question.best_answer}\n\n"
        context, target_ids = encode_prompt_target(self.tokenizer, self.prompt(question), target)
        return LMExample(context + target_ids, len(context))

    def eval_item(self, question: GenerationQuestion, uid: int | None = None) -> TruthfulQAGenerationItem:
        true_refs, false_refs = truthfulqa_gen_references(question.correct_answers, question.incorrect_answers)
        return TruthfulQAGenerationItem(
            uid=question.index,
            id=question.id,
            group=question.category,
            context_ids=self.tokenizer(self.prompt(question))["input_ids"],
            question=question.question,
            true_refs=true_refs,
            false_refs=false_refs,
        )

    def judge_settings(self) -> JudgeSettings | None:
        return self.judges
