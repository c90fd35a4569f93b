"""Checks of a saved PEFT adapter (``--model.adapter_path``) before and while it is loaded, so a
wrong directory or an adapter of another model is one clear line, not a PEFT traceback."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdecode_pl.models.loading import resolve_name_or_path
from svdecode_pl.models.peft_methods import peft_method, reinitialise_adapter
from svdecode_pl.models.zero import gathered, zero3_enabled
from svdecode_pl.utils.errors import AdapterError, CheckpointError, one_line
from svdecode_pl.utils.files import atomic_directory

_CONFIG_FILE = "adapter_config.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _same_model(recorded: str, name_or_path: str) -> bool:
    """Whether an adapter's recorded base model names the model given: the same string, the same
    resolved path, or the same final path component (a hub id vs. its local copy)."""
    given = {name_or_path, resolve_name_or_path(name_or_path)}
    if recorded in given:
        return True
    if Path(recorded).exists() and any(Path(g).exists() and Path(g).resolve() == Path(recorded).resolve()
                                       for g in given):
        return True
    return Path(recorded.rstrip("/")).name in {Path(g.rstrip("/")).name for g in given}


def check_adapter(path: str | Path, name_or_path: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` after checking that ``path`` is a PEFT adapter
    directory; warns when its recorded base model is not ``name_or_path`` (the shapes may still
    fit, e.g. a copy of the same model under another name)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: adapter directory not found (--model.adapter_path)")
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (--model.adapter_path expects a PEFT adapter directory)")
    config_file = path / _CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"{path}: not a PEFT adapter (no {_CONFIG_FILE}; save one with save_pretrained)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise AdapterError(f"{config_file}: field 'peft_type': missing (not a PEFT adapter config)")
    peft_method(config["peft_type"], f"{config_file}: field 'peft_type':")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise AdapterError(f"{path}: not a PEFT adapter (no {' or '.join(_WEIGHT_FILES)})")
    recorded = config.get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and not _same_model(recorded, name_or_path):
        warnings.warn(
            f"{config_file}: field 'base_model_name_or_path': the adapter was trained on {recorded!r}, "
            f"it is loaded onto --model.name_or_path {name_or_path!r}", stacklevel=2)
    return config


def load_checked_adapter(model: nn.Module, path: str | Path, name_or_path: str, trainer: Any = None) -> nn.Module:
    """:func:`svdecode_pl.models.adapters.load_adapter` after :func:`check_adapter`; an adapter whose weights
    do not fit the model's shapes (or modules) is an :class:`~svdecode_pl.utils.errors.AdapterError`
    naming the adapter and the model."""
    from safetensors import SafetensorError

    pass

    config = check_adapter(path, name_or_path)
    try:
        return load_adapter(model, str(path), trainer)
    except SafetensorError as err:
        raise AdapterError(f"{path}: adapter weights truncated or corrupt ({one_line(str(err))})") from None
    except (RuntimeError, ValueError, KeyError) as err:
        text = str(err)
        if isinstance(err, RuntimeError) and "size mismatch" not in text:
            raise
        if isinstance(err, ValueError) and "not found in the base model" not in text:
            raise
        detail = next((line.strip() for line in text.splitlines() if "size mismatch" in line), text.splitlines()[0])
        raise AdapterError(
            f"{path}: adapter of {config.get('base_model_name_or_path')!r} does not fit --model.name_or_path "
            f"{name_or_path!r}: {detail}") from None


def check_checkpoint_weights(model: nn.Module, state_dict: dict[str, Any], source: Any) -> None:
    """The weights of a checkpoint (only the trainable ones are saved) are this model's trainable
    weights, name for name and shape for shape; else one line. Lightning loads non-strictly (the
    frozen base weights are not in the checkpoint), so another model's or PEFT method's weights
    would otherwise be skipped without a word and the run go on from a fresh adapter."""
    trainable = {f"model.{name}": p for name, p in model.named_parameters() if p.requires_grad}
    if not state_dict and not trainable:
        return
    missing = sorted(set(trainable) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(trainable))
    if unexpected or missing:
        what = f"its weight {unexpected[0]!r} is not" if unexpected else f"this model's {missing[0]!r} is not in it"
        raise CheckpointError(f"--ckpt_path {source}: a checkpoint of another model or PEFT method ({what} among "
                              f"this model's {len(trainable)} trainable weights)")
    for name, tensor in state_dict.items():
        parameter = trainable[name]
        shape, own = tuple(getattr(tensor, "shape", ())), tuple(getattr(parameter, "ds_shape", parameter.shape))
        if shape and shape != own:  # (ZeRO-3 keeps a parameter's full shape in ds_shape)
            raise CheckpointError(f"--ckpt_path {source}: weight {name!r} has shape {shape}, this model's "
                                  f"{own}: a checkpoint of another model")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def initialize_adapter(model: nn.Module, seed: int, trainer: Any = None) -> None:
    """(Re-)initialise the adapter from ``seed`` alone, the way PEFT does, so that the same seed
    gives the same adapter under any strategy and process count. Under ZeRO-3 this is also
    what restores PEFT's initialisation, lost when zero.Init partitioned the new weights."""
    zero3 = zero3_enabled(trainer)
    rank = trainer.global_rank if trainer is not None else 0
    with gathered(trainable_parameters(model), zero3, modifier_rank=0):
        if zero3 and rank != 0:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reinitialise_adapter(model)


def load_adapter(model: nn.Module, adapter_path: str, trainer: Any) -> nn.Module:
    """A saved PEFT adapter on ``model``; under ZeRO-3 its weights are written into the shards."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(adapter_path)
    if not zero3_enabled(trainer):
        # PEFT loads prompt-learning adapters frozen only; they are used for scoring then.
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=not peft_method(config).virtual_tokens)
    from safetensors.torch import load_file

    config.inference_mode = False
    model = get_peft_model(model, config)
    with gathered(trainable_parameters(model), True, modifier_rank=0):
        if trainer.global_rank == 0:
            set_peft_model_state_dict(model, load_file(str(Path(adapter_path) / "adapter_model.safetensors")))
    return model


def save_adapter(model: nn.Module, directory: str | Path, trainer: Any, tokenizer: Any = None) -> None:
    """The adapter in PEFT's standard format, written by the first process (all must call)."""
    if not hasattr(model, "peft_config"):
        return
    rank = trainer.global_rank if trainer is not None else 0
    with gathered(trainable_parameters(model), zero3_enabled(trainer)):
        if rank == 0:
            with atomic_directory(directory) as tmp:  # a kill leaves the previous adapter or the new one
                model.save_pretrained(str(tmp))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
