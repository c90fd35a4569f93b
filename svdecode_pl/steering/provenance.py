"""What a steering vector was fitted with (the adapter's content, the base model, the task, the seed),
recorded in its metadata under its own key, so a run's parts stay together: ``test`` and ``predict``
use the vector that belongs to the adapter they load and refuse one that does not.

A vector fitted by a warm-start belongs to exactly one adapter: steering another adapter (or the base
model) with it scores a model it was never fitted on, and the results look normal. Vectors written
before this record existed carry none and are accepted as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from svdecode_pl.utils.errors import SteeringArtifactError

#: the key of the vector's metadata that holds the record
PROVENANCE_KEY = "provenance"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class RunProvenance:
    """The run a steering vector was fitted in."""

    adapter_sha256: str | None
    """Content hash of the adapter's weights file as the fit wrote it (None: fitted without an adapter)."""
    adapter_dir: str | None
    """Where the fit wrote the adapter (for messages; a copy elsewhere has the same hash)."""
    base_model: str
    """``--model.name_or_path`` of the fit."""
    task: str
    """The task and its data (``truthfulqa_mc: synthetic:...``)."""
    seed: int | None
    """The run's global seed (``--seed_everything``; None: unseeded)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> RunProvenance | None:
        """The record in a vector's metadata (None for a vector written before it existed)."""
        record = metadata.get(PROVENANCE_KEY)
        if not isinstance(record, dict):
            return None
        return cls(**{name: record.get(name) for name in cls.__dataclass_fields__})


def adapter_content_hash(directory: str | Path | None) -> str | None:
    """SHA-256 of an adapter directory's weights file (None: no adapter there)."""
    if directory is None:
        return None
    for name in _WEIGHT_FILES:
        path = Path(directory) / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def check_vector_belongs(metadata: dict[str, Any], source: str, adapter_path: str | None,
                         weights_from_checkpoint: bool = False) -> None:
    """Refuse (one line) a vector fitted with another adapter than ``adapter_path``, or with an
    adapter when none is loaded. ``weights_from_checkpoint``: the adapter's weights come from a
    Lightning checkpoint (``--ckpt_path``), which cannot be compared; accepted."""
    record = RunProvenance.of(metadata)
    if record is None or record.adapter_sha256 is None:
        return
    short = record.adapter_sha256[:12]
    if adapter_path is None:
        if weights_from_checkpoint:
            return
        raise SteeringArtifactError(
            f"{source}: field 'provenance.adapter_sha256': fitted with the adapter {record.adapter_dir} ({short}), "
            f"but no adapter is loaded: pass --model.adapter_path {record.adapter_dir}")
    given = adapter_content_hash(adapter_path)
    if given != record.adapter_sha256:
        raise SteeringArtifactError(
            f"{source}: field 'provenance.adapter_sha256': fitted with the adapter {record.adapter_dir} ({short}), "
            f"not with --model.adapter_path {adapter_path} ({(given or 'no weights')[:12]}): use that adapter's own "
            f"vector ({Path(adapter_path) / 'steering'}) or its own run directory")
