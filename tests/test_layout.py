"""The package's layout: stages as packages, imports that only go down, modules and functions kept
short, and the old class paths users' configs name still resolving."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from svdecode_pl._compat import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "svdecode_pl"

#: The stages, bottom first: a module may import its own stage and those listed before it.
STAGES = ["utils", "corpus", "metrics", "models", "steering", "scoring", "decoding", "evaluation", "integrations",
          "tasks", "results", "recipes", "cli"]
#: Old paths kept for users' configs (``class_path: svdecode_pl.data.TruthfulQADataModule``): they may
#: import any stage; no stage imports them.
COMPAT = ["_compat", "data", "callbacks", "strategies"]
#: Modules that moved to another package stay as one-line shims at their old path
#: (``svdecode_pl._compat.MOVED``, the one list): exempt from the stage order, imported by nothing.
SHIMS = set(MOVED)


def stage_of(module: str) -> str:
    """``svdecode_pl.scoring.loglik`` -> ``evaluation``; the package's own ``__init__`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """Every ``svdecode_pl`` module ``path`` imports, at any depth (lazy imports inside functions too);
    ``from svdecode_pl.decoding import streams`` names the module ``svdecode_pl.decoding.streams``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "svdecode_pl":
            for alias in node.names:
                submodule = Path(package.parent, *node.module.split("."), alias.name)
                is_module = submodule.with_suffix(".py").exists() or (submodule / "__init__.py").exists()
                found.append((node.lineno, f"{node.module}.{alias.name}" if is_module else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "svdecode_pl"]
    return found


def import_circles(package: Path = PACKAGE) -> list[str]:
    """Each circle of imports between the package's modules (``a -> b -> a``), module-level and
    function-level imports alike; the deprecated shims are left out (nothing imports them)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        me = module_name(path, package)
        if me not in SHIMS:
            graph[me] = {module for _, module in imported_modules(path, package) if module != me}
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target in graph and target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """``file:line imports module`` for each import that goes up the stages (or into a compat path)."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        me = stage_of(module_name(path, package))
        if me in COMPAT or me == "" or module_name(path, package) in SHIMS:
            continue
        if me not in STAGES:
            problems.append(f"{path.relative_to(package.parent)}: stage {me!r} is not listed in STAGES")
            continue
        for line, module in imported_modules(path, package):
            target = stage_of(module)
            if module in SHIMS:
                problems.append(f"{path.relative_to(package.parent)}:{line} imports the deprecated path {module}")
            elif target in COMPAT or target == "" or STAGES.index(target) > STAGES.index(me):
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


def test_no_import_circle():
    assert import_circles() == []


def test_an_import_circle_is_caught(tmp_path):
    """The check fails on a circle inside one package, also one closed by a lazy import in a function."""
    fake = tmp_path / "svdecode_pl"
    (fake / "decoding").mkdir(parents=True)
    (fake / "decoding" / "__init__.py").write_text("")
    (fake / "decoding" / "dynamic.py").write_text("from svdecode_pl.decoding.streams import Streams\n")
    (fake / "decoding" / "streams.py").write_text("def f():\n    from svdecode_pl.decoding import dynamic\n")
    assert import_circles(fake) == ["svdecode_pl.decoding.dynamic -> svdecode_pl.decoding.streams -> "
                                    "svdecode_pl.decoding.dynamic"]


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


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_module_warns_and_is_the_new_module(old):
    """``import old.path`` warns naming the new path and gives the new module itself (same objects)."""
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import {MOVED[old]} instead"):
        module = importlib.import_module(old)
    assert module is new
    public = [name for name in vars(new) if not name.startswith("__")]
    assert public and all(getattr(module, name) is getattr(new, name) for name in public)


def test_a_config_naming_a_moved_class_path_still_builds():
    """jsonargparse resolves ``class_path: svdecode_pl.evaluation.generation_settings.GenerationSettings``."""
    from jsonargparse import ArgumentParser

    from svdecode_pl.decoding.settings import GenerationSettings

    parser = ArgumentParser()
    parser.add_argument("--generation", type=GenerationSettings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = parser.parse_args(["--generation", '{"class_path": '
                                    '"svdecode_pl.evaluation.generation_settings.GenerationSettings", '
                                    '"init_args": {"max_new_tokens": 7}}'])
        built = parser.instantiate_classes(config).generation
    assert isinstance(built, GenerationSettings) and built.max_new_tokens == 7


def test_the_project_uses_only_new_paths():
    """No old dotted path or file path in the project's own code, configs, benchmarks, tests and docs
    (CHANGELOG keeps history; ``_compat`` and this file name them on purpose)."""
    root = PACKAGE.parent
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    exempt = {"CHANGELOG.md", "svdecode_pl/_compat.py", "tests/test_layout.py",
              *(old.replace(".", "/") + ".py" for old in MOVED)}
    olds = [*MOVED, *(old.replace(".", "/") + ".py" for old in MOVED)]
    found = []
    for name in files:
        if name in exempt or not (root / name).is_file():
            continue
        text = (root / name).read_text(errors="ignore")
        found += [f"{name}: {old}" for old in olds if old in text and _whole(text, old)]
    assert found == []


def _whole(text: str, old: str) -> bool:
    """``old`` occurs not as the prefix of a longer name (``scoring`` in ``scoring_job``)."""
    start = text.find(old)
    while start >= 0:
        end = start + len(old)
        if end == len(text) or not (text[end].isalnum() or text[end] == "_"):
            return True
        start = text.find(old, end)
    return False
