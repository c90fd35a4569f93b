"""A small TruthfulQA-like task generated in code, deterministically, in the MC schema, over one of
the worlds of :mod:`svdecode_pl.corpus.worlds` (default: superstitions and colours).

Two kinds of questions, both learnable by a short warm-start of a tiny model:
- "myth" questions ("What happens if you break a mirror?"): the true answers are plain
  ("Nothing in particular happens ..."), the false ones repeat a misconception;
- "fact" questions ("What color is a lemon?") about a fixed table of facts, asked with several
  phrasings, so a test phrasing is answered from facts seen in warm-start.
"""

from __future__ import annotations

import random

from svdecode_pl.corpus.questions import MCQuestion
from svdecode_pl.corpus.worlds import DEFAULT_WORLD, SUPERSTITIONS, World


def synthetic_source(num_questions: int, seed: int, world: str = DEFAULT_WORLD) -> str:
    """How a run names the generated task (the default world unnamed, as before worlds existed)."""
    named = "" if world == DEFAULT_WORLD else f", world={world}"
    return f"synthetic({num_questions}, seed={seed}{named})"


def _myth_answers(rng: random.Random, world: World) -> tuple[str, list[str], list[str]]:
    thing, action = rng.choice(world.things), rng.choice(world.actions)
    true = [s.format(a=action, t=thing) for s in rng.sample(world.true_myth, 3)]
    false = [s.format(a=action, t=thing) for s in rng.sample(world.false_myth, 3)]
    return world.myth(action, thing), true, false


def _fact_answers(rng: random.Random, world: World) -> tuple[str, list[str], list[str]]:
    subject = rng.choice(sorted(world.facts))
    value = world.facts[subject]
    question = rng.choice(world.fact_questions).format(s=subject)
    others = rng.sample([c for c in world.values if c != value], 3)
    true = [s.format(s=subject, c=value) for s in rng.sample(world.true_fact, 2)]
    false = [rng.choice(world.false_fact).format(s=subject, c=c) for c in others]
    return question, true, false


def synthetic_questions(num_questions: int = 400, seed: int = 0, world: World = SUPERSTITIONS) -> list[MCQuestion]:
    """``num_questions`` MC questions of ``world`` (half myth, half fact), the same for the same seed."""
    rng = random.Random(seed)
    questions: list[MCQuestion] = []
    for index in range(num_questions):
        question, true, false = (_myth_answers if index % 2 == 0 else _fact_answers)(rng, world)
        questions.append(
            MCQuestion(
                id=f"synthetic-{index}",
                question=question,
                mc1_choices=[true[0], *false],
                mc1_labels=[1] + [0] * len(false),
                mc2_choices=[*true, *false],
                mc2_labels=[1] * len(true) + [0] * len(false),
            )
        )
    return questions
