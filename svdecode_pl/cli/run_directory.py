"""A run directory holds one run, written by one command at a time; checked before any model loads.

- ``fit``, ``test`` and ``predict`` take the directory's lock (:mod:`svdecode_pl.utils.run_lock`).
- ``fit`` into a directory that holds a finished or an interrupted run is refused unless
  ``--ckpt_path`` says to continue it (Lightning would start at step 0 and write ``last-v1.ckpt``
  beside the old ``last.ckpt``; a later resume then picks the older one).
- ``test``/``predict`` with ``--model.adapter_path`` into the directory of another run (its own
  ``adapter/`` another adapter) are refused: results of one adapter never land in another's run;
  the vector they will read must belong to the adapter given.
- ``--ckpt_path`` must be a Lightning checkpoint of the same model and PEFT method.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from svdecode_pl.cli.preflight import _CKPT_KEYWORDS, _get
from svdecode_pl.recipes.run_unit import vector_directory_of
from svdecode_pl.steering.provenance import adapter_content_hash, check_vector_belongs
from svdecode_pl.utils.errors import CheckpointError, OptionError
from svdecode_pl.utils.run_lock import lock_run_directory

#: the subcommands that write into the run directory
WRITING = ("fit", "test", "predict")


def claim_run_directory(config: Any, subcommand: str | None) -> None:
    """The lock, then what the directory may hold for this subcommand (the checkpoint is checked
    earlier: :func:`check_given_checkpoint`)."""
    if subcommand not in WRITING:
        return
    root = Path(_get(config, "trainer.default_root_dir") or os.getcwd())
    lock_run_directory(root, subcommand)
    ckpt = _get(config, "ckpt_path")
    if subcommand == "fit":
        check_fit_target(root, ckpt)
        return
    adapter = _get(config, "model.adapter_path")
    check_evaluation_target(root, adapter)
    if _get(config, "steering.enabled") is not False:
        check_vector_of(vector_directory_of(root, adapter, _get(config, "steering.dirpath")), adapter, ckpt)


def check_given_checkpoint(config: Any) -> None:
    """``--ckpt_path`` against the options the user gave, before LightningCLI reads the checkpoint's
    hyper-parameters into the config: a checkpoint of another model would replace
    ``--model.name_or_path`` there without a word, and a file of another kind end in an unpickling
    traceback."""
    ckpt = _get(config, "ckpt_path")
    if ckpt is None or str(ckpt) in _CKPT_KEYWORDS or not Path(ckpt).is_file():
        return  # a keyword, a DeepSpeed directory, or a missing file (preflight names it)
    check_checkpoint(Path(ckpt), str(_get(config, "model.name_or_path")), _get(config, "model.peft.class_path"))


def _checkpoints(root: Path) -> list[Path]:
    found = [*root.glob("hpc_ckpt_*.ckpt"), *(root / "checkpoints").glob("*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def check_fit_target(root: Path, ckpt: Any) -> None:
    """A fit starts in an empty run directory, or continues the one there with ``--ckpt_path``."""
    if ckpt is not None:
        return
    option = f"--trainer.default_root_dir {root}"
    checkpoints = _checkpoints(root)
    if os.environ.get("SLURM_JOB_ID") and any(p.name.startswith("hpc_ckpt_") for p in checkpoints):
        return  # Lightning resumes a requeued SLURM job from its hpc checkpoint itself
    last = root / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() else (checkpoints[-1] if checkpoints else None)
    finished = [p.parent for p in (root / "adapter" / "adapter_config.json", root / "steering" / "steering_vector.json")
                if p.is_file()]
    if finished:
        more = f", or continue it with --ckpt_path {resume}" if resume else ""
        raise OptionError(f"{option}: holds a finished run ({finished[0]}); fit into a new directory{more}")
    if resume is not None:
        raise OptionError(f"{option}: holds an interrupted fit ({resume}); resume it with --ckpt_path {resume}, "
                          "or fit into a new directory")


def _same_adapter(given: Path, own: Path) -> bool:
    if given.resolve() == own.resolve():
        return True
    content = adapter_content_hash(given)
    return content is not None and content == adapter_content_hash(own)


def check_evaluation_target(root: Path, adapter_path: Any) -> None:
    """Results of ``--model.adapter_path`` are not written into the directory of another run."""
    own = root / "adapter"
    if adapter_path is None or not (own / "adapter_config.json").is_file():
        return
    if not _same_adapter(Path(adapter_path), own):
        raise OptionError(
            f"--trainer.default_root_dir {root}: holds another run (its adapter {own} is not --model.adapter_path "
            f"{adapter_path}); write into the adapter's own run directory ({Path(adapter_path).parent}) or a new one")


def check_vector_of(directory: Path, adapter_path: Any, ckpt: Any) -> None:
    """The vector test/predict will read belongs to the adapter given, checked on its metadata before
    any model loads (the callback checks it again when it loads the vector); a file that is not valid
    JSON is left to the loader, which names what is wrong with it."""
    meta_file = directory / "steering_vector.json"
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8")).get("metadata")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(metadata, dict):
        check_vector_belongs(metadata, str(meta_file), None if adapter_path is None else str(adapter_path),
                             weights_from_checkpoint=ckpt is not None)


def _head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(16)


def _kind_of(path: Path) -> str:
    """What a file that is no torch checkpoint looks like, for the message."""
    head = _head(path)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        return "a safetensors file (adapter or model weights, not a Lightning checkpoint)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a torch checkpoint"


def check_checkpoint(path: Path, name_or_path: str, peft_class_path: str | None) -> None:
    """``--ckpt_path`` is a Lightning checkpoint of this model and PEFT method (the module checks the
    weights' names and shapes again when it loads them)."""
    option = f"--ckpt_path {path}"
    if path.is_dir():
        return  # a DeepSpeed checkpoint (a directory): its strategy reads and checks it
    if not zipfile.is_zipfile(path) and _head(path)[:1] != b"\x80":  # torch's zip or legacy pickle format
        raise CheckpointError(f"{option}: {_kind_of(path)}; expected a Lightning checkpoint (.ckpt)")
    from lightning.fabric.utilities.cloud_io import _load

    try:
        checkpoint = _load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 -- any unpickling failure means: not a checkpoint we can read
        raise CheckpointError(f"{option}: cannot be read as a Lightning checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{option}: not a Lightning checkpoint (no 'state_dict')")
    recorded = checkpoint.get("svdecode_run") or {}
    model = recorded.get("name_or_path") or (checkpoint.get("hyper_parameters") or {}).get("name_or_path")
    if model is not None and model != name_or_path:
        raise CheckpointError(f"{option}: a checkpoint of model {model!r}, not --model.name_or_path "
                              f"{name_or_path!r}: pass the checkpoint of a run of this model")
    peft = recorded.get("peft")
    wanted = None if peft_class_path is None else str(peft_class_path).rsplit(".", 1)[-1]
    if peft is not None and wanted is not None and peft != wanted:
        raise CheckpointError(f"{option}: a checkpoint of a {peft} adapter, not of --model.peft {peft_class_path}: "
                              "pass the checkpoint of a run with this PEFT method")
