"""Old import paths, kept resolving for users' code and configs.

Two kinds: the class paths of the flat layout (``svdecode_pl.data.*``, ``svdecode_pl.callbacks.*``,
``svdecode_pl.strategies.*``), forwarded name by name; and modules that moved to another package
(:data:`MOVED`), each left as a one-line module that warns and then *is* the new module (same
objects, private names included). Nothing in the package imports either.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module -> the module it moved to (CHANGELOG.md)
MOVED = {
    "svdecode_pl.evaluation.attention": "svdecode_pl.scoring.attention",
    "svdecode_pl.evaluation.encoding": "svdecode_pl.scoring.encoding",
    "svdecode_pl.evaluation.packing": "svdecode_pl.scoring.packing",
    "svdecode_pl.evaluation.scoring": "svdecode_pl.scoring.loglik",
    "svdecode_pl.evaluation.scoring_job": "svdecode_pl.scoring.job",
    "svdecode_pl.evaluation.device_defaults": "svdecode_pl.models.device_defaults",
    "svdecode_pl.evaluation.generation": "svdecode_pl.decoding.generation",
    "svdecode_pl.evaluation.generation_settings": "svdecode_pl.decoding.settings",
    "svdecode_pl.evaluation.dynamic": "svdecode_pl.decoding.dynamic",
    "svdecode_pl.evaluation.mixed_dynamic": "svdecode_pl.decoding.mixed_dynamic",
    "svdecode_pl.evaluation.dynamic_beams": "svdecode_pl.decoding.beams",
    "svdecode_pl.evaluation.compiled": "svdecode_pl.decoding.compiled",
    "svdecode_pl.evaluation.merged": "svdecode_pl.decoding.merged",
    "svdecode_pl.evaluation.lm_eval_backend": "svdecode_pl.integrations.lm_eval_backend",
    "svdecode_pl.steering.artifact": "svdecode_pl.integrations.artifact",
    "svdecode_pl.steering.logit_bias": "svdecode_pl.integrations.logit_bias",
}


def moved_module(old: str) -> ModuleType:
    """Warn that ``old`` moved, then make ``import old`` give the new module itself."""
    new = MOVED[old]
    warnings.warn(f"{old} is deprecated: import {new} instead", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module


def forwarder(module_name: str, names: dict[str, str]):
    """A module ``__getattr__`` that loads ``names`` (name -> new module) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
