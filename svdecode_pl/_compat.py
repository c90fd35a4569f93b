"""Old import paths that users' configs name as ``class_path`` (``svdecode_pl.data.*``,
``svdecode_pl.callbacks.*``, ``svdecode_pl.strategies.*``), kept resolving after the stage layout
(CHANGELOG.md). Nothing in the package imports these modules."""

from __future__ import annotations

import importlib
from typing import Any


def forwarder(module_name: str, names: dict[str, str]):
    """A module ``__getattr__`` that loads ``names`` (name -> new module) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
