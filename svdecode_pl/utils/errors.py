"""User mistakes as one line and exit status 2: the error types, and how an exception becomes
that line (:func:`user_error_message`)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

#: environment variable that makes ``svdecode`` print the traceback of user errors too
DEBUG_ENV = "SVDECODE_DEBUG"


class UserInputError(Exception):
    """A mistake in what the user gave (a file, a path, an option value); the message says which
    file, record and field, and what is wrong with it, on one line."""


class OptionError(UserInputError, ValueError):
    """An option value that the parser's types accept but the program cannot use."""


class CommandLineError(OptionError):
    """An option or config file the parser rejects (misspelt, missing, not YAML, not a valid
    value), with at most one line of hint, such as the closest valid option names."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SteeringArtifactError(UserInputError, ValueError):
    """A steering artifact (``steering_vector.json`` + ``.safetensors``) that cannot be used."""


class AdapterError(UserInputError, ValueError):
    """A PEFT adapter directory that cannot be loaded onto the model."""


class ExternalError(UserInputError):
    """Something outside the run failed (the network, the Hub): one line that says what to do next."""


class CheckpointError(UserInputError, ValueError):
    """A ``--ckpt_path`` that is no Lightning checkpoint of this model and PEFT method."""


class ModelPathError(UserInputError, OSError):
    """A model or tokenizer that cannot be found or loaded from ``--model.name_or_path``."""

_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

# modules whose OSError means "this model / tokenizer path or hub id cannot be resolved"
_MODEL_LOADERS = ("transformers.", "huggingface_hub.")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and those it was raised from or during (Lightning and jsonargparse may wrap)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _raised_in(error: BaseException, prefixes: tuple[str, ...]) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    module = frames[-1].filename.replace(os.sep, ".")
    return any(f".{prefix}" in module for prefix in prefixes)


def user_warning(message: str) -> None:
    """One line on stderr, ``svdecode: warning: ...``, from the first process only: something the
    run did to the user's input (e.g. cut a prompt to fit the model), said once, without a traceback."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    if all(os.environ.get(name, "0") in ("", "0") for name in ranks):
        print(f"svdecode: warning: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """The message on one line: the first non-empty line, whitespace collapsed, bounded in length."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = " ".join((lines[0] if lines else "").split())
    return line if len(line) <= 500 else line[:497] + "..."


def user_error_hint(error: BaseException) -> str | None:
    """The hint line that goes with :func:`user_error_message`'s line, if the error has one."""
    for link in _chain(error):
        if isinstance(link, UserInputError):
            hint = getattr(link, "hint", None)
            return one_line(hint) if hint else None
    return None


def user_error_message(error: BaseException) -> str | None:
    """One line for an error caused by the user's input, None for a bug of the project.

    User errors: :class:`UserInputError` (and so :class:`~svdecode_pl.utils.errors.DataFormatError`),
    a missing or unreadable path (``FileNotFoundError`` and kin), and an ``OSError`` raised by
    transformers / huggingface_hub while resolving a model or tokenizer name.
    """
    for link in _chain(error):
        if isinstance(link, UserInputError):
            return one_line(str(link)) or type(link).__name__
    for link in _chain(error):
        if _out_of_memory(link):
            return out_of_memory_message(link)
    for link in _chain(error):
        if isinstance(link, _PATH_ERRORS):
            if link.filename is not None and link.strerror:
                return one_line(f"{link.filename}: {link.strerror}")
            return one_line(str(link)) or type(link).__name__
        if isinstance(link, OSError) and _raised_in(link, _MODEL_LOADERS):
            return one_line(str(link))
    return None


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError``, the CPU allocator's RuntimeError, Python's MemoryError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    markers = ("DefaultCPUAllocator", "can't allocate memory", "out of memory")
    return isinstance(error, RuntimeError) and any(marker.lower() in text.lower() for marker in markers)


def out_of_memory_message(error: BaseException) -> str:
    """One line for a failed allocation, with what to lower."""
    text = one_line(str(error))
    asked = re.search(r"tried to allocate ([\d.]+ ?\w+)", text, re.IGNORECASE)
    size = f" (an allocation of {asked.group(1)})" if asked else ""
    return (f"out of memory{size}: lower --data.eval_batch_size, --model.score_batch_tokens or --model.chunk_tokens "
            "(or --data.batch_size when fitting), shorten the inputs, or use a device with more memory")


@contextlib.contextmanager
def loading_model(name_or_path: str, what: str = "model") -> Iterator[None]:
    """Inside: an ``OSError`` of transformers / huggingface_hub (no such directory, no config,
    unknown hub id, offline) becomes a :class:`ModelPathError` that names ``name_or_path``."""
    try:
        yield
    except (OSError, ValueError) as err:
        invalid_id = type(err).__name__ == "HFValidationError"  # a path-like name that is no hub id
        if isinstance(err, UserInputError) or not (isinstance(err, OSError) or invalid_id):
            raise
        if not _raised_in(err, _MODEL_LOADERS):
            raise
        where = "no such directory" if _looks_like_path(name_or_path) and not Path(name_or_path).exists() else None
        raise ModelPathError(f"{name_or_path}: cannot load the {what}: {where or one_line(str(err))}") from err


def _looks_like_path(name: str) -> bool:
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1


class DataFormatError(UserInputError, ValueError):
    """A data file that cannot be read as it should; the message names file, record and field."""
