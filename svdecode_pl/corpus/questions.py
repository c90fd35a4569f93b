"""A multiple-choice question in TruthfulQA's MC schema, as read from a file or generated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MCQuestion:
    """One multiple-choice question with its MC1 set (one true answer) and MC2 set."""

    id: str
    question: str
    mc1_choices: list[str]
    mc1_labels: list[int]
    mc2_choices: list[str]
    mc2_labels: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_answer(self) -> str:
        return self.mc1_choices[self.mc1_labels.index(1)]

    @property
    def answers(self) -> list[str]:
        """Every distinct answer of both sets, each scored once."""
        return list(dict.fromkeys(self.mc1_choices + self.mc2_choices))
