"""Task data modules: TruthfulQA MC and generation, the commonsense sets, any prompt/completion task.

The names are imported on first use: the data modules bring Lightning, which the record readers
(``svdecode_pl.data.records``, used by ``svdecode report`` and ``sweep``) do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svdecode_pl.data.base import TaskDataModule  # noqa: F401
    from svdecode_pl.data.commonsense import CommonsenseDataModule  # noqa: F401
    from svdecode_pl.data.completion import PromptCompletionDataModule  # noqa: F401
    from svdecode_pl.data.records import DataFormatError, MCQuestion  # noqa: F401
    from svdecode_pl.data.truthfulqa import TruthfulQADataModule  # noqa: F401
    from svdecode_pl.data.truthfulqa_gen import TruthfulQAGenerationDataModule  # noqa: F401

_MODULES = {
    "CommonsenseDataModule": "commonsense",
    "DataFormatError": "records",
    "MCQuestion": "records",
    "PromptCompletionDataModule": "completion",
    "TaskDataModule": "base",
    "TruthfulQADataModule": "truthfulqa",
    "TruthfulQAGenerationDataModule": "truthfulqa_gen",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
