"""The pre-training text of a miniature (``svdecode-mini`` and its family): a task's world under a
misconception prior.

TruthfulQA's premise is that models imitate common misconceptions because their pre-training text
repeats them. This corpus makes that true by construction, so that a model pre-trained on it
(``svdecode_pl.models.miniature``) has the prior that SVDecode's task then corrects.

Design (fixed before any steering measurement):

* Shared world: exactly the tables of the generated task (``svdecode_pl.corpus.worlds``; the
  recipe's ``world``, default ``superstitions``), so pre-training and task differ only in the answer
  *prior*, never in vocabulary or phrasing.
* Myth questions: a misconception (one of the world's false templates, uniform) with probability
  ``misconception_share`` (``svdecode-mini``: ``MISCONCEPTION_SHARE = 0.75``), else a truthful answer
  (a true template, uniform). The truthful class stays in the model's support (it "knows" the
  sceptical answer, it is just rarer), so a short warm-start moves mass between two classes the
  model already produces.
* Fact questions: always the true value. The prior differs from the task on myths only
  (imitative falsehoods, not ignorance).
* Documents mimic the evaluation context: ``pairs_per_doc`` Q/A pairs separated by blank lines;
  every ``primer_every``-th batch starts each document with the QA primer of the protocols.
"""

from __future__ import annotations

import random

from svdecode_pl.corpus.primer import QA_PRIMER
from svdecode_pl.corpus.worlds import DEFAULT_WORLD, SUPERSTITIONS, World, world_named

CORPUS_VERSION = 1
MISCONCEPTION_SHARE = 0.75

#: The text recipe of ``svdecode-mini`` (the model recipes in ``models/`` extend it; a recipe
#: without a ``world`` key is over ``superstitions``).
CORPUS_RECIPE: dict = dict(
    corpus_version=CORPUS_VERSION,
    misconception_share=MISCONCEPTION_SHARE,
    primer_every=4,
    pairs_per_doc=4,
    fact_share=0.5,
)


def recipe_world(recipe: dict) -> World:
    """The world a recipe's text is drawn from."""
    return world_named(recipe.get("world", DEFAULT_WORLD), option="recipe world")


def myth_pair(rng: random.Random, misconception_share: float = MISCONCEPTION_SHARE,
              world: World = SUPERSTITIONS) -> tuple[str, str, bool]:
    """(question, answer, truthful) for a myth question, the answer drawn from the pre-training prior."""
    thing, action = rng.choice(world.things), rng.choice(world.actions)
    truthful = rng.random() >= misconception_share
    template = rng.choice(world.true_myth if truthful else world.false_myth)
    return world.myth(action, thing), template.format(a=action, t=thing), truthful


def fact_pair(rng: random.Random, world: World = SUPERSTITIONS) -> tuple[str, str]:
    """(question, answer) for a fact question: always the true value, any of the task's phrasings."""
    subject = rng.choice(sorted(world.facts))
    question = rng.choice(world.fact_questions).format(s=subject)
    return question, rng.choice(world.true_fact).format(s=subject, c=world.facts[subject])


def document(rng: random.Random, recipe: dict = CORPUS_RECIPE, primer: bool = False) -> str:
    """One document: [primer] + Q/A pairs, blank-line separated (the MC prompt's layout)."""
    world, pairs = recipe_world(recipe), []
    for _ in range(recipe["pairs_per_doc"]):
        if rng.random() < recipe["fact_share"]:
            q, a = fact_pair(rng, world)
        else:
            q, a, _ = myth_pair(rng, recipe["misconception_share"], world)
        pairs.append(f"Q: {q}\nA: {a}")
    head = [QA_PRIMER] if primer else []
    return "\n\n".join(head + pairs)


def document_stream(seed: int = 0) -> random.Random:
    """The seeded generator behind the corpus for ``seed`` (one stream, drawn in order)."""
    return random.Random(f"svdecode-mini-corpus-{seed}")


def corpus(num_documents: int, seed: int = 0, recipe: dict = CORPUS_RECIPE) -> list[str]:
    """The first ``num_documents`` documents of the stream for ``seed`` (deterministic)."""
    rng = document_stream(seed)
    return [document(rng, recipe, primer=i % recipe["primer_every"] == 0) for i in range(num_documents)]


def corpus_tables(world: World = SUPERSTITIONS) -> list:
    """Everything the text depends on besides the recipe (for a cache key): the eight tables
    ``svdecode-mini``'s key has always hashed, then the world's other tables where they differ from
    the first world's (none for ``superstitions``, so its key is what it was before worlds existed)."""
    tables = [list(world.things), list(world.actions), list(world.true_myth), list(world.false_myth),
              dict(world.facts), list(world.fact_questions), list(world.true_fact), QA_PRIMER]
    rest = ("myth_question", "false_fact", "fact_probe")
    differ = {name: getattr(world, name) for name in rest if getattr(world, name) != getattr(SUPERSTITIONS, name)}
    return tables + ([differ] if differ else [])
