"""The pre-training text of the miniature (``svdecode-mini``): the task's world, a misconception prior.

TruthfulQA's premise is that models imitate common misconceptions because their pre-training text
repeats them. This corpus makes that true by construction, so that a model pre-trained on it
(``svdecode_pl.models.miniature``) has the prior that SVDecode's task then corrects.

Design (fixed before any steering measurement):

* Shared world: exactly the tables of the generated task (``svdecode_pl.corpus.synthetic``), so
  pre-training and task differ only in the answer *prior*, never in vocabulary or phrasing.
* Myth questions: a misconception (one of the task's false templates, uniform) with probability
  ``MISCONCEPTION_SHARE = 0.75``, else a truthful answer (a true template, uniform). The truthful
  class stays in the model's support (it "knows" the sceptical answer, it is just rarer), so a short
  warm-start moves mass between two classes the model already produces.
* Fact questions: always the true colour. The prior differs from the task on myths only
  (imitative falsehoods, not ignorance).
* Documents mimic the evaluation context: ``pairs_per_doc`` Q/A pairs separated by blank lines;
  every ``primer_every``-th batch starts each document with the QA primer of the protocols.
"""

from __future__ import annotations

import random

from svdecode_pl.corpus import synthetic as world
from svdecode_pl.corpus.primer import QA_PRIMER

CORPUS_VERSION = 1
MISCONCEPTION_SHARE = 0.75

#: The text recipe (the model recipe in ``models/miniature.py`` extends it).
CORPUS_RECIPE: dict = dict(
    corpus_version=CORPUS_VERSION,
    misconception_share=MISCONCEPTION_SHARE,
    primer_every=4,
    pairs_per_doc=4,
    fact_share=0.5,
)


def myth_pair(rng: random.Random, misconception_share: float = MISCONCEPTION_SHARE) -> tuple[str, str, bool]:
    """(question, answer, truthful) for a myth question, the answer drawn from the pre-training prior."""
    thing, action = rng.choice(world.THINGS), rng.choice(world.ACTIONS)
    truthful = rng.random() >= misconception_share
    template = rng.choice(world.TRUE_MYTH if truthful else world.FALSE_MYTH)
    return f"What happens if you {action} {thing}?", template.format(a=action, t=thing), truthful


def fact_pair(rng: random.Random) -> tuple[str, str]:
    """(question, answer) for a fact question: always the true colour, any of the task's phrasings."""
    subject = rng.choice(sorted(world.FACTS))
    question = rng.choice(world.FACT_QUESTIONS).format(s=subject)
    return question, rng.choice(world.TRUE_FACT).format(s=subject, c=world.FACTS[subject])


def document(rng: random.Random, recipe: dict = CORPUS_RECIPE, primer: bool = False) -> str:
    """One document: [primer] + Q/A pairs, blank-line separated (the MC prompt's layout)."""
    pairs = []
    for _ in range(recipe["pairs_per_doc"]):
        if rng.random() < recipe["fact_share"]:
            q, a = fact_pair(rng)
        else:
            q, a, _ = myth_pair(rng, recipe["misconception_share"])
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


def corpus_tables() -> list:
    """Everything the text depends on besides the recipe (for a cache key)."""
    return [world.THINGS, world.ACTIONS, world.TRUE_MYTH, world.FALSE_MYTH, world.FACTS,
            world.FACT_QUESTIONS, world.TRUE_FACT, QA_PRIMER]
