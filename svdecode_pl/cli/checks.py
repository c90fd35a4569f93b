"""What the command line gives, checked before any work starts: config files (before Lightning is
even imported), the parser's own complaints turned into one line and a hint, every path the user
names, and option combinations that cannot run. Each mistake is a :class:`CommandLineError` or
:class:`OptionError`, which ``svdecode`` prints as one line (two with a hint) and exit status 2."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from svdecode_pl.utils.errors import CommandLineError, one_line

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def config_file_arguments(argv: list[str]) -> list[str]:
    """The values of every ``--config`` / ``-c`` in ``argv``."""
    values = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` of a Lightning subcommand is a readable YAML file (or an inline YAML
    mapping, which jsonargparse also accepts); otherwise one line naming the file."""
    if argv[:1] and argv[0] not in LIGHTNING_SUBCOMMANDS:
        return
    import yaml

    for value in config_file_arguments(argv):
        path = Path(value)
        if not path.exists():
            try:
                inline = isinstance(yaml.safe_load(value), dict)
            except yaml.YAMLError:
                inline = False
            if inline:
                continue
            raise CommandLineError(f"--config {value}: no such file", hint=_similar_files(path))
        if path.is_dir():
            raise CommandLineError(f"--config {value}: is a directory, not a config file")
        try:
            load_yaml_strictly(path.read_text(encoding="utf-8"), f"--config {value}")
        except UnicodeDecodeError as err:
            raise CommandLineError(f"--config {value}: not valid UTF-8 (byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or one_line(str(err))
            raise CommandLineError(f"--config {value}: not valid YAML: {problem}{where}") from None


def load_yaml_strictly(text: str, source: str) -> Any:
    """YAML as ``yaml.safe_load`` reads it, but a key given twice in one mapping is refused (YAML
    keeps the last silently: a second ``model:`` block drops the first, adapter and all)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    raise CommandLineError(f"{source}: key {key!r} given twice (line {seen[key]} and line {line}); "
                                           "the second would replace the first: merge them into one")
                seen.setdefault(key, line)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)


def _similar_files(path: Path) -> str | None:
    """'did you mean' over the YAML files beside the missing one."""
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return None
    names = [p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml", ".json")]
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return did_you_mean([str(folder / name) if str(path.parent) != "." else name for name in close])


def did_you_mean(candidates: list[str]) -> str | None:
    """The hint line for the closest candidates, as git words it."""
    return f"did you mean {' or '.join(candidates)}?" if candidates else None


def option_names(parser: Any) -> list[str]:
    """Every long option of a (sub)command parser, nested groups included."""
    return [name for action in parser._actions for name in action.option_strings if name.startswith("--")]


_LITERAL = re.compile(r"Expected a typing\.Literal\[(?P<choices>.*?)\]\.? Got value: (?P<value>.*)")
#: a Literal among a Union's subtypes (``mode: Literal[...] | None``, ``strength: Literal[...] | float``)
_UNION_LITERAL = re.compile(r"- Expected a typing\.Literal\[(?P<choices>.*?)\]\s*$", re.M)
_EXPECTED = re.compile(r"Expected a <class '(?:[\w.]+\.)?(\w+)'>")
_GIVEN = re.compile(r"(?:Given|Got) value: (.*)")


def describe_parser_error(message: str, parser: Any) -> CommandLineError:
    """jsonargparse's message (which it prints after the whole usage) as one line naming the
    option and what is wrong, plus the closest valid options or values as a hint."""
    text = message.strip()
    unknown = re.match(r"unrecognized arguments: (\S+)", text)
    if unknown:
        name = unknown.group(1).split("=", 1)[0]
        if not name.startswith("-"):
            return CommandLineError(f"{name}: unexpected argument (options start with --)")
        close = difflib.get_close_matches(name, option_names(parser), n=3, cutoff=0.6)
        return CommandLineError(f"{name}: no such option", hint=did_you_mean(close))
    choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", text)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(3))
        close = difflib.get_close_matches(choice.group(2), options, n=2, cutoff=0.5)
        return CommandLineError(f"{choice.group(2)}: not a subcommand (one of {', '.join(options)})",
                                hint=did_you_mean(close))
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if not keyed:
        return CommandLineError(one_line(text))
    return _describe_key(f"--{keyed.group(1)}", keyed.group(2))


def _describe_class_error(option: str, class_path: str, detail: str) -> CommandLineError:
    """A complaint about one init argument of ``--data.class_path``-style subclasses."""
    class_name = class_path.rsplit(".", 1)[-1]
    unknown = re.match(r"Option '([^']+)' is not accepted", detail.strip())
    if unknown:
        name = f"{option}.{unknown.group(1)}"
        accepted = [f"{option}.{p}" for p in init_parameters(class_path)]
        close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.6)
        return CommandLineError(f"{name}: no such option of {class_name}", hint=did_you_mean(close))
    keyed = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', detail, re.S)
    if keyed:
        return _describe_key(f"{option}.{keyed.group(1)}", keyed.group(2))
    return CommandLineError(f"{option} ({class_name}): {one_line(detail)}")


def init_parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameter names of an importable class (none if it cannot be imported)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p for p in parameters if p != "self" and parameters[p].kind not in (2, 4)]


def _describe_key(option: str, detail: str) -> CommandLineError:
    nested = re.search(r"Problem with given class_path '([\w.]+)':\s*(.*?)(?:\n\s*- |\Z)", detail, re.S)
    if nested:
        return _describe_class_error(option, nested.group(1), nested.group(2))
    missing = re.match(r"File does not exist: '?([^']*)'?", detail)
    if missing:
        return CommandLineError(f"{option} {missing.group(1)}: no such file")
    expected = _EXPECTED.findall(detail)
    given = _GIVEN.search(detail)
    literal = _LITERAL.search(detail) or (_UNION_LITERAL.search(detail) if given else None)
    if literal:
        choices = re.findall(r"'([^']*)'", literal.group("choices"))
        value = (literal.groupdict().get("value") or given.group(1)).strip()
        close = difflib.get_close_matches(value, choices, n=2, cutoff=0.5)
        others = "".join(", or null" if kind == "NoneType" else f", or a {kind}" for kind in dict.fromkeys(expected))
        return CommandLineError(f"{option} {value}: not one of {', '.join(choices)}{others}", hint=did_you_mean(close))
    if expected and given:
        kinds = " or ".join(dict.fromkeys("None" if kind == "NoneType" else kind for kind in expected))
        return CommandLineError(f"{option} {given.group(1).strip()}: expected {kinds}")
    return CommandLineError(f"{option}: {one_line(detail)}")
