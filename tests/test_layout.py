"""The package's layout: stages as packages, imports that only go down, modules and functions kept
short, and the old class paths users' configs name still resolving."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "svdecode_pl"

#: The stages, bottom first: a module may import its own stage and those listed before it.
STAGES = ["utils", "corpus", "metrics", "models", "steering", "evaluation", "tasks", "results", "recipes", "cli"]
#: Old paths kept for users' configs (``class_path: svdecode_pl.data.TruthfulQADataModule``): they may
#: import any stage; no stage imports them.
COMPAT = ["_compat", "data", "callbacks", "strategies"]


def stage_of(module: str) -> str:
    """``svdecode_pl.evaluation.scoring`` -> ``evaluation``; the package's own ``__init__`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every ``svdecode_pl`` module ``path`` imports, at any depth (lazy imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "svdecode_pl":
            for alias in node.names:  # ``from svdecode_pl import scoring`` names a module
                module = node.module if node.module != "svdecode_pl" else f"svdecode_pl.{alias.name}"
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "svdecode_pl"]
    return found


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """``file:line imports module`` for each import that goes up the stages (or into a compat path)."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        me = stage_of(module_name(path, package))
        if me in COMPAT or me == "":
            continue
        if me not in STAGES:
            problems.append(f"{path.relative_to(package.parent)}: stage {me!r} is not listed in STAGES")
            continue
        for line, module in imported_modules(path):
            target = stage_of(module)
            if target in COMPAT or target == "" or STAGES.index(target) > STAGES.index(me):
                problems.append(f"{path.relative_to(package.parent)}:{line} ({me}) imports {module}")
    return problems


def test_every_package_is_a_listed_stage():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages == set(STAGES)
    assert modules == set(COMPAT)


def test_imports_only_go_down():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself fails on an upward import, also one hidden inside a function."""
    fake = tmp_path / "svdecode_pl"
    (fake / "steering").mkdir(parents=True)
    (fake / "steering" / "vector.py").write_text("def f():\n    from svdecode_pl.tasks.base import TaskDataModule\n")
    assert upward_imports(fake) == ["svdecode_pl/steering/vector.py:2 (steering) imports svdecode_pl.tasks.base"]


def test_each_stage_says_what_it_holds():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), stage


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if source.count("\n") > 400:
            long_modules.append(str(path))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}")
    assert long_modules == [] and long_functions == []


@pytest.mark.parametrize("path", [
    "svdecode_pl.data.TruthfulQADataModule", "svdecode_pl.data.TruthfulQAGenerationDataModule",
    "svdecode_pl.data.CommonsenseDataModule", "svdecode_pl.data.PromptCompletionDataModule",
    "svdecode_pl.data.TaskDataModule", "svdecode_pl.callbacks.RunCheckpoint",
    "svdecode_pl.callbacks.JSONLPredictionWriter", "svdecode_pl.callbacks.SteeringVectorCallback",
    "svdecode_pl.callbacks.PhaseProgressBar", "svdecode_pl.strategies.CPUDeepSpeedStrategy",
])
def test_old_class_paths_resolve(path):
    module, name = path.rsplit(".", 1)
    value = getattr(importlib.import_module(module), name)
    assert isinstance(value, type) and value.__name__ == name
