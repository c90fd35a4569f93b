"""The PEFT methods the project supports, one row each: what the rest of the code needs to know
about a method (how it is re-initialised from a seed, whether it puts virtual tokens in front of the
input or a prefix in the KV cache, whether its update can be switched per row of a batch, whether it
merges into the weights). Every other module asks this table, never the adapter's type.

Adding a method: one :class:`PeftMethod` row in :data:`PEFT_METHODS` (and the tests of
``tests/test_peft_methods.py`` run it end to end). PEFT's private names are used here only
(:data:`PEFT_PRIVATE_NAMES`, checked against the installed PEFT by the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from svdecode_pl.utils.errors import AdapterError

if TYPE_CHECKING:  # torch and PEFT are imported where used: the report reads method names without them
    from torch import nn

#: The PEFT releases whose private names below were checked (``tests/test_peft_methods.py``).
PEFT_CHECKED = "0.21.2"
#: Private PEFT attributes this module uses: (PEFT class, attribute), looked up on the installed PEFT by the tests.
PEFT_PRIVATE_NAMES = (("peft.tuners.tuners_utils.BaseTunerLayer", "_disable_adapters"),
                      ("peft.utils.other.AuxiliaryTrainingWrapper", "_disable_adapters"))


def _reset_lora(module: nn.Module, model: nn.Module) -> None:
    if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
        for name in module.lora_A:
            module.reset_lora_parameters(name, model.peft_config[name].init_lora_weights)


def _reset_ia3(module: nn.Module, model: nn.Module) -> None:
    if hasattr(module, "reset_ia3_parameters") and hasattr(module, "ia3_l"):
        for name in module.ia3_l:
            module.reset_ia3_parameters(name)


def _reset_virtual_tokens(module: nn.Module, model: nn.Module) -> None:
    """The prompt / prefix embeddings, where PEFT draws them at random (not from a text's tokens)."""
    from torch import nn

    if isinstance(module, nn.Embedding) and module.weight.requires_grad:
        config = next(iter(model.peft_config.values()))
        if str(getattr(config, "prompt_tuning_init", "RANDOM")).upper().endswith("RANDOM"):
            module.reset_parameters()


@dataclass(frozen=True)
class PeftMethod:
    """One supported PEFT method's facts."""

    peft_type: str
    """PEFT's ``PeftType`` value (what ``adapter_config.json`` records)."""
    config_class: str
    """The config's class path (``class_path`` in a config file)."""
    name: str
    """The paper's name of the method (report tables)."""
    reinitialise: Callable[[nn.Module, nn.Module], None]
    """Re-draws one module's adapter weights (module, PeftModel) from the current RNG state."""
    virtual_tokens: bool = False
    """Adds virtual tokens in front of the input (prompt learning): no adapter layers to switch off
    or merge, and outputs carry ``num_virtual_tokens`` extra leading positions."""
    prefix_in_cache: bool = False
    """The virtual tokens are keys/values put in the KV cache (prefix tuning), not input embeddings."""
    mixes_rows: bool = False
    """Its update can be scaled per row of a batch (one-pass dynamic decoding, :mod:`.mixed_dynamic`)."""
    mergeable: bool = False
    """Its layers merge into the base weights and unmerge (:mod:`svdecode_pl.decoding.merged`)."""


#: peft_type -> method; the README's four: LoRA, IA3, Prompt Tuning, P-Tuning v2 (= prefix tuning)
PEFT_METHODS = {method.peft_type: method for method in (
    PeftMethod("LORA", "peft.LoraConfig", "LoRA", _reset_lora, mixes_rows=True, mergeable=True),
    PeftMethod("IA3", "peft.IA3Config", "IA3", _reset_ia3, mergeable=True),
    PeftMethod("PROMPT_TUNING", "peft.PromptTuningConfig", "Prompt Tuning", _reset_virtual_tokens,
               virtual_tokens=True),
    PeftMethod("PREFIX_TUNING", "peft.PrefixTuningConfig", "P-Tuning v2", _reset_virtual_tokens,
               virtual_tokens=True, prefix_in_cache=True),
)}


def peft_method(config: Any, source: str = "--model.peft") -> PeftMethod | None:
    """The row of ``config`` (a PeftConfig, or the ``peft_type`` an adapter_config.json records; None:
    no adapter); a method not in the table is one line that names the supported ones."""
    if config is None:
        return None
    peft_type = config if isinstance(config, str) else getattr(config, "peft_type", None)
    peft_type = str(getattr(peft_type, "value", peft_type))
    if peft_type not in PEFT_METHODS:
        name = "" if isinstance(config, str) else f" {type(config).__module__.split('.')[0]}.{type(config).__name__}:"
        raise AdapterError(f"{source}{name} PEFT method {peft_type!r} is not supported "
                           f"(supported: {', '.join(m.config_class for m in PEFT_METHODS.values())})")
    return PEFT_METHODS[peft_type]


def method_of(model: nn.Module) -> PeftMethod | None:
    """The row of a PeftModel's active adapter; None for a model without one."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    return peft_method(model.active_peft_config, f"{type(model).__name__}:")


def method_name(config_class: str | None) -> str:
    """The report's name of a method recorded by its config class name (``LoraConfig``); ``none`` for none."""
    if config_class is None:
        return "none"
    return next((m.name for m in PEFT_METHODS.values() if m.config_class.rsplit(".", 1)[1] == config_class), "?")


def lacks(model: nn.Module, trait: str) -> str | None:
    """Why the model's active adapter does not have ``trait`` (``mergeable``, ``mixes_rows``); None when it has."""
    method = method_of(model)
    if method is None:
        return "not a PeftModel"
    if method.virtual_tokens:
        return "prompt learning (virtual tokens, no adapter layers)"
    return None if getattr(method, trait) else f"{method.name}: not {trait}"


def is_prompt_learning(model: nn.Module) -> bool:
    """The active adapter adds virtual tokens in front of the input (Prompt Tuning, P-Tuning v2)."""
    method = method_of(model)
    return method is not None and method.virtual_tokens


def virtual_token_count(model: nn.Module) -> int:
    """How many virtual tokens the active adapter puts in front of the input (0 for none)."""
    return model.active_peft_config.num_virtual_tokens if is_prompt_learning(model) else 0


def reinitialise_adapter(model: nn.Module) -> None:
    """Re-draw every adapter weight of a PeftModel from the current RNG state, as its method's row says."""
    method = method_of(model)
    if method is None:
        return
    for module in model.modules():
        method.reinitialise(module, model)


def switchable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose adapter a disable flag switches off (tuner layers, ``modules_to_save`` wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    return [m for m in model.modules() if isinstance(m, kinds) and hasattr(m, "_disable_adapters")]


class AdapterSwitch:
    """Turns a PeftModel's adapter layers off and on around one forward pass, cheaply.

    PEFT's ``disable_adapter()`` context inspects every module (``get_model_status``) and resets
    ``requires_grad`` on each use, which costs more than a tiny model's decoding step; here the
    layers are collected once and only their disable flag (what their forward reads) flips.
    Prompt learning has no adapter layers: its pre-trained model is the wrapped model itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = switchable_layers(model)

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        states = [layer._disable_adapters for layer in self.layers]
        try:
            for layer in self.layers:
                layer._disable_adapters = True
            yield
        finally:
            for layer, state in zip(self.layers, states):
                layer._disable_adapters = state
