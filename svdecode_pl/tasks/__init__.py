"""Stage 9, tasks: one Lightning data module per file, each with its own item type; the registry below
names them for the CLI. May import stages 0-8.

A new task is one file: a :class:`~svdecode_pl.tasks.base.TaskDataModule` subclass and its item
type (an :class:`~svdecode_pl.evaluation.items.EvalItem` subclass that grades itself and annotates
its record). Add it to :data:`TASKS` to give it a short name, or pass its import path as
``data.class_path``. The names load on first use (the record readers need no Lightning).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svdecode_pl.tasks.base import TaskDataModule  # noqa: F401
    from svdecode_pl.tasks.commonsense import CommonsenseDataModule  # noqa: F401
    from svdecode_pl.tasks.completion import PromptCompletionDataModule  # noqa: F401
    from svdecode_pl.tasks.truthfulqa_gen import TruthfulQAGenerationDataModule  # noqa: F401
    from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule  # noqa: F401

#: The built-in tasks: class name -> module. The one place a task is registered.
TASKS = {
    "TruthfulQADataModule": "truthfulqa_mc",
    "TruthfulQAGenerationDataModule": "truthfulqa_gen",
    "CommonsenseDataModule": "commonsense",
    "PromptCompletionDataModule": "completion",
}
_NAMES = {**TASKS, "TaskDataModule": "base"}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def task_classes() -> list[type]:
    """Every registered task's data module class (imports them)."""
    return [__getattr__(name) for name in TASKS]
