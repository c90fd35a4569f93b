"""One shareable artifact: a PEFT adapter directory with its steering vector in ``steering/`` and a
``custom_generate/generate.py`` that decodes steered in plain transformers.

PEFT ignores the extra folders, so the directory still loads as a plain adapter
(``PeftModel.from_pretrained``); the vector's own format is unchanged. :func:`load_steered`
returns the model with steering attached in one call; :func:`push_to_hub` uploads the whole folder.

    model = load_steered("runs/x/adapter")            # or a Hub repo's local snapshot
    model.generate(**inputs)                           # steered
    model.generate(**inputs, custom_generate="runs/x/adapter", trust_remote_code=True)  # plain transformers
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from torch import nn

from svdecode_pl.models.heads import output_vocab_size
from svdecode_pl.models.loading import DType, load_causal_lm
from svdecode_pl.steering.processor import SteeringLogitsProcessor
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import AdapterError, SteeringArtifactError

STEERING_DIR = "steering"
GENERATE_FILE = Path("custom_generate") / "generate.py"
_TEMPLATE = Path(__file__).with_name("custom_generate_template.py")


def save_artifact(model: nn.Module | None, vector: SteeringVector | None, directory: str | Path,
                  tokenizer: Any = None) -> Path:
    """Write the adapter (when ``model`` is given: a PeftModel), ``steering/`` and ``custom_generate/``
    into ``directory``. Without a model the directory must already hold the adapter (``svdecode fit``
    has written it)."""
    directory = Path(directory)
    if model is not None:
        model.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    if not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{directory}: no adapter_config.json (an artifact is a PEFT adapter directory)")
    if vector is not None:
        vector.save(directory / STEERING_DIR)
        write_custom_generate(directory)
    return directory


def write_custom_generate(directory: str | Path, repo_id: str | None = None) -> Path:
    """``custom_generate/generate.py``: transformers copies it into its module cache, so it cannot
    find the vector beside itself; the artifact's local path and Hub repo id are written into it."""
    directory = Path(directory)
    source = _TEMPLATE.read_text()
    source = source.replace('ARTIFACT_DIR = None', f"ARTIFACT_DIR = {str(directory.resolve())!r}")
    source = source.replace('REPO_ID = None', f"REPO_ID = {repo_id!r}")
    path = directory / GENERATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return path


def find_steering_dir(path: str | Path) -> Path | None:
    """The vector of an artifact (``<dir>/steering``), of an old run directory's adapter
    (``<run>/adapter`` beside ``<run>/steering``) or a vector directory itself; None without one."""
    path = Path(path)
    for candidate in (path, path / STEERING_DIR, path.parent / STEERING_DIR):
        if (candidate / "steering_vector.json").is_file():
            return candidate
    return None


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter records (``base_model_name_or_path``)."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter or artifact directory)")
    name = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not name:
        raise AdapterError(f"{config_file}: field 'base_model_name_or_path': missing (pass base_model=...)")
    return name


def load_steered(path: str | Path, base_model: str | None = None, dtype: DType = "float32",
                 mu: float | None = None) -> nn.Module:
    """Base model + adapter + steering vector in one call: the PeftModel, with ``steering_vector``
    set (None without a vector) and ``generate`` steering every step. Run directories written
    before the artifact existed (``<run>/adapter`` + ``<run>/steering``) load the same way."""
    from peft import PeftModel

    path = Path(path)
    model = PeftModel.from_pretrained(load_causal_lm(base_model or adapter_base_model(path), dtype), str(path))
    model.eval()
    vector_dir = find_steering_dir(path)
    vector = SteeringVector.load(vector_dir) if vector_dir is not None else None
    if vector is not None:
        if mu is not None:
            vector = vector.with_mu(mu)
        vector.check_compatible(output_vocab_size(model), None, source=str(vector_dir / "steering_vector.json"))
        model.generate = functools.partial(_steered_generate, model.generate, model, vector)
    model.steering_vector = vector
    return model


def _steered_generate(generate: Any, model: nn.Module, vector: SteeringVector, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with the steering processor first (a fresh one per call: its cache is per call)."""
    num_beams = kwargs.get("num_beams") or getattr(model.generation_config, "num_beams", 1) or 1
    base = model if vector.needs_base_logits else None
    processor = SteeringLogitsProcessor(vector, base_model=base, attention_mask=kwargs.get("attention_mask"),
                                        log_probs=num_beams > 1)
    kwargs["logits_processor"] = [processor, *(kwargs.get("logits_processor") or [])]
    return generate(*args, **kwargs)


def push_to_hub(directory: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                endpoint: str | None = None, commit_message: str = "SVDecode adapter + steering vector") -> str:
    """Upload the artifact (adapter, ``steering/``, ``custom_generate/``) as one commit; returns the
    commit URL. ``custom_generate/generate.py`` is rewritten first to fetch the vector from ``repo_id``."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{directory}: no adapter_config.json (not an artifact directory)")
    if find_steering_dir(directory) != directory / STEERING_DIR:
        raise SteeringArtifactError(f"{directory / STEERING_DIR}: no steering vector to upload")
    write_custom_generate(directory, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
