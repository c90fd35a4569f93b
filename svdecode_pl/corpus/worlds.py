"""The worlds of the generated TruthfulQA-like tasks: one table set per domain (``worlds.yaml``
beside this module), shared by a task and the miniature pre-trained on it
(``svdecode_pl.corpus.miniature``), so pre-training and task differ only in the answer prior, never
in vocabulary or phrasing.

A world has two kinds of questions: myth questions (``myth_question`` over things x actions; true
answers plain, false ones a misconception) and fact questions (``fact_questions`` over the ``facts``
table; the false answers state another value of the table). Placeholders: ``{a}`` action, ``{t}``
thing, ``{s}`` subject, ``{c}`` value. Each world has its own domain and vocabulary (none is about
health or animals: an outside reviewer holds a miniature of that domain as an independent check).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from svdecode_pl.utils.errors import OptionError


@dataclass(frozen=True)
class World:
    """One domain's tables (see the module docstring for the placeholders)."""

    name: str
    things: tuple[str, ...]
    actions: tuple[str, ...]
    myth_question: str
    true_myth: tuple[str, ...]
    false_myth: tuple[str, ...]
    facts: Mapping[str, str]
    fact_questions: tuple[str, ...]
    true_fact: tuple[str, ...]
    false_fact: tuple[str, ...]
    #: the short true-fact answer the prior diagnostic scores against every other value
    fact_probe: str
    #: the generation task's categories of the myth and the fact questions
    categories: tuple[str, str]

    @property
    def values(self) -> list[str]:
        """The fact table's distinct values, sorted (the distractors of a fact question)."""
        return sorted(set(self.facts.values()))

    def myth(self, action: str, thing: str) -> str:
        return self.myth_question.format(a=action, t=thing)

    def corpus_words(self) -> list[str]:
        """Words the world's tokenizer should know (so the task is not spelled byte by byte); for
        ``superstitions`` exactly the list the tiny models' tokenizer was first trained on."""
        text = " ".join([*self.things, *self.actions, *self.true_myth, *self.false_myth, *self.facts, *self.values])
        question = re.sub(r" ?\{[at]\}", "", self.myth_question)  # the myth question's own words
        text += " " + " ".join([*self.fact_questions, *self.true_fact, question])
        for placeholder in ("{a}", "{t}", "{s}", "{c}"):
            text = text.replace(placeholder, "")
        return [w.strip(".,?") for w in text.split()]


def _read_worlds(path: Path) -> dict[str, World]:
    """The worlds of a YAML file of the form of ``worlds.yaml`` (one mapping of tables per world)."""
    import yaml

    worlds = {}
    for name, tables in yaml.safe_load(path.read_text()).items():
        fields = {key: value if isinstance(value, (str, dict)) else tuple(value) for key, value in tables.items()}
        worlds[name] = World(name=name, **fields)
    return worlds


#: superstitions (svdecode-mini's and every config's default), gadgets, garden, kitchen, sports, school: ``worlds.yaml``
WORLDS: dict[str, World] = _read_worlds(Path(__file__).with_name("worlds.yaml"))
SUPERSTITIONS = WORLDS["superstitions"]
DEFAULT_WORLD = SUPERSTITIONS.name


def world_named(name: str, option: str = "--data.world") -> World:
    """The world called ``name``; a user's unknown name is one line naming the option and the choices."""
    if name not in WORLDS:
        raise OptionError(f"{option} {name!r}: no such world (expected one of {', '.join(WORLDS)})")
    return WORLDS[name]
