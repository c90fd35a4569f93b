"""A parsed command, checked before any class is instantiated (so before any model loads):
every path the user names can be used, and the options combine into something that can run.
Without this, a run directory that is a file ends in a traceback, and a combination that cannot
run (sampling at temperature 0) fails only once the classes are built. Dynamic steering with beam
search is no such combination: the dynamic loop runs beam search."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from svdecode_pl.corpus.worlds import world_named
from svdecode_pl.utils.errors import OptionError
from svdecode_pl.utils.validation import FINITE, check_value

#: ``ckpt_path`` values that Lightning resolves itself (not files)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def _get(config: Any, key: str) -> Any:
    """``config[key]`` for a dotted key of a jsonargparse Namespace or a dict, None where absent."""
    node = config
    for part in key.split("."):
        if node is None:
            return None
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return node


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is not a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _first_existing(path: Path) -> Path:
    return next((c for c in (path, *path.parents) if c.exists()), Path("."))


def check_directory(option: str, value: str | os.PathLike | None) -> None:
    """``value`` is a directory, or one can be created there."""
    if value is None or str(value) == "":
        return
    path = Path(value).expanduser()
    blocker = _blocking_file(path)
    if blocker == path:
        raise OptionError(f"{option} {value}: is a file, not a directory")
    if blocker is not None:
        raise OptionError(f"{option} {value}: cannot create it: {blocker} is a file, not a directory")
    existing = _first_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {value}: {existing} is not writable")


def check_output_file(option: str, value: str | os.PathLike | None) -> None:
    """``value`` can be written: not a directory, its folder a directory or creatable."""
    if value is None or str(value) == "":
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise OptionError(f"{option} {value}: is a directory, not a file")
    if str(path.parent) not in ("", "."):
        check_directory(option, path.parent)


def check_input(option: str, value: str | os.PathLike | None, what: str) -> None:
    """``value`` (what the run reads) exists; ``what``: ``adapter`` (a directory), ``file``, or
    ``path`` (either)."""
    if value is None or str(value) == "":
        return
    path = Path(value).expanduser()
    if what == "adapter":
        if not path.exists():
            raise OptionError(f"{option} {value}: adapter directory not found")
        if not path.is_dir():
            raise OptionError(f"{option} {value}: is a file, not an adapter directory")
        return
    if not path.exists():
        raise OptionError(f"{option} {value}: no such file")
    if what == "file" and path.is_dir():
        raise OptionError(f"{option} {value}: is a directory, not a file")


def _callbacks(config: Any) -> list[Any]:
    listed = _get(config, "trainer.callbacks") or []
    return listed if isinstance(listed, list) else [listed]


def check_paths(config: Any) -> None:
    """Every path of a parsed subcommand config, before anything is instantiated."""
    check_directory("--trainer.default_root_dir", _get(config, "trainer.default_root_dir"))
    check_directory("--steering.dirpath", _get(config, "steering.dirpath"))
    check_input("--model.adapter_path", _get(config, "model.adapter_path"), "adapter")
    check_input("--data.path", _get(config, "data.init_args.path"), "path")
    ckpt = _get(config, "ckpt_path")
    if ckpt is not None and str(ckpt) not in _CKPT_KEYWORDS:
        check_input("--ckpt_path", ckpt, "file")
    for callback in _callbacks(config):
        name = str(_get(callback, "class_path") or "").rsplit(".", 1)[-1]
        check_output_file(f"{name} output", _get(callback, "init_args.output"))
        check_directory(f"{name} dirpath", _get(callback, "init_args.dirpath"))


def check_combinations(config: Any) -> None:
    """Options that each hold but cannot run together, named both."""
    generation = "data.init_args.generation"
    temperature = _get(config, f"{generation}.temperature")
    if _get(config, f"{generation}.do_sample") is True and temperature is not None and not float(temperature) > 0.0:
        raise OptionError(
            f"--data.generation.do_sample true cannot run with --data.generation.temperature {temperature}: "
            "sampling needs temperature > 0 (greedy decoding: --data.generation.do_sample false)"
        )


def check_strength(config: Any) -> None:
    """The steering strength's options: finite numbers, and ``mu_scale`` only where it scales something."""
    strength, scale = _get(config, "steering.strength"), _get(config, "steering.mu_scale")
    for option, value in (("--steering.strength", strength), ("--steering.mu_scale", scale)):
        if isinstance(value, float):
            check_value(option, value, FINITE)
    if strength in (None, "validation") and scale is not None and float(scale) != 1.0:
        raise OptionError(f"--steering.mu_scale {scale} cannot run with --steering.strength validation: it scales "
                          "an estimate or a fixed strength (e.g. --steering.strength mu_star)")


def check_names(config: Any) -> None:
    """Options that name something built in: the generated task's world."""
    world = _get(config, "data.init_args.world")
    if world is not None:
        world_named(str(world))


def preflight(config: Any) -> None:
    """All checks of a parsed subcommand config."""
    check_paths(config)
    check_names(config)
    check_strength(config)
    check_combinations(config)
