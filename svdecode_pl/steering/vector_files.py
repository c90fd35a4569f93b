"""The steering artifact's files (``steering_vector.json`` + ``steering_vector.safetensors``), read
with every field checked: each problem is a :class:`SteeringArtifactError` naming the file and field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from svdecode_pl.steering.values import STEERING_RULES
from svdecode_pl.utils.errors import SteeringArtifactError

TENSORS_FILE = "steering_vector.safetensors"
META_FILE = "steering_vector.json"
#: version of the artifact's layout; an artifact without the field is version 1. Version 2: the
#: strength choice as a typed record (``strength_choice``), and the static direction kept in a
#: dynamic vector too (so either mode can be scored); version 1 still loads.
FORMAT_VERSION = 2


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metadata(meta_file: Path) -> dict[str, Any]:
    """``steering_vector.json``, every field checked."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SteeringArtifactError(f"{meta_file}: not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise SteeringArtifactError(f"{meta_file}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise SteeringArtifactError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")

    def fail(name: str, problem: str) -> SteeringArtifactError:
        return SteeringArtifactError(f"{meta_file}: field {name!r}: {problem}")

    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail("format_version", f"expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise fail("format_version", f"{version}: written by a newer svdecode (this one reads up to "
                                     f"{FORMAT_VERSION}); upgrade svdecode-pl")
    for key in ("mode", "mu", "confidence_threshold", "metadata"):
        if key not in meta:
            raise fail(key, "missing")
    if meta["mode"] not in ("static", "dynamic"):
        raise fail("mode", f"unknown mode {meta['mode']!r} (expected 'static' or 'dynamic')")
    if not _is_number(meta["mu"]) or not math.isfinite(meta["mu"]):
        raise fail("mu", f"expected a finite number, got {meta['mu']!r}")
    threshold = STEERING_RULES["confidence_threshold"].problem(meta["confidence_threshold"])
    if threshold is not None:
        raise fail("confidence_threshold", f"{threshold}, got {meta['confidence_threshold']!r}")
    if not isinstance(meta["metadata"], dict):
        raise fail("metadata", f"expected a JSON object, got {type(meta['metadata']).__name__}")
    vocab_size = meta["metadata"].get("vocab_size")
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1):
        raise fail("metadata.vocab_size", f"expected a positive integer, got {vocab_size!r}")
    if meta["mode"] == "dynamic" and vocab_size is None:
        raise fail("metadata.vocab_size", "missing (a dynamic vector records the vocabulary it was fitted on)")
    return meta


def has_direction(tensor_file: Path) -> bool:
    """Whether a (version 2) dynamic vector's tensor file holds the static direction too."""
    if not tensor_file.is_file():
        return False
    try:
        return "direction" in load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SteeringArtifactError(f"{tensor_file}: truncated or corrupt safetensors file ({err})") from None


def read_direction(tensor_file: Path, vocab_size: int | None) -> torch.Tensor:
    """The static direction: present, readable, a finite float32 (V,) tensor of the recorded size."""
    if not tensor_file.is_file():
        raise SteeringArtifactError(f"{tensor_file}: not found (a static steering vector needs its direction)")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SteeringArtifactError(f"{tensor_file}: truncated or corrupt safetensors file ({err})") from None
    if "direction" not in tensors:
        raise SteeringArtifactError(f"{tensor_file}: tensor 'direction': missing (found {sorted(tensors)})")
    direction = tensors["direction"]
    if direction.dtype != torch.float32:
        raise SteeringArtifactError(f"{tensor_file}: tensor 'direction': dtype {direction.dtype}, expected float32")
    if direction.dim() != 1 or (vocab_size is not None and direction.numel() != vocab_size):
        expected = "(V,)" if vocab_size is None else f"({vocab_size},) as metadata.vocab_size says"
        raise SteeringArtifactError(
            f"{tensor_file}: tensor 'direction': shape {tuple(direction.shape)}, expected {expected}")
    bad = int((~torch.isfinite(direction)).sum())
    if bad:
        raise SteeringArtifactError(f"{tensor_file}: tensor 'direction': {bad} NaN or infinite entries")
    return direction
