"""The PEFT methods' registry: every row runs (seeded re-initialisation, its traits), an unknown method
is one line naming the supported ones, and the private PEFT names the registry uses exist in the
installed PEFT and still do what it relies on."""

from __future__ import annotations

import importlib

import peft
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from svdecode_pl.models.adapters import initialize_adapter
from svdecode_pl.models.loading import load_causal_lm, resolve_name_or_path
from svdecode_pl.models.peft_methods import (
    PEFT_CHECKED,
    PEFT_METHODS,
    PEFT_PRIVATE_NAMES,
    AdapterSwitch,
    method_name,
    method_of,
    peft_method,
    switchable_layers,
)
from svdecode_pl.utils.errors import AdapterError, user_error_message

CONFIGS = {
    "LORA": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "IA3": lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM"),
    "PROMPT_TUNING": lambda: PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "PREFIX_TUNING": lambda: PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}


def build(config):
    torch.manual_seed(0)
    return get_peft_model(load_causal_lm(resolve_name_or_path("svdecode-tiny")), config).eval()


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_every_row_is_tested():
    assert set(CONFIGS) == set(PEFT_METHODS)


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_each_method_is_reinitialised_from_the_seed(peft_type):
    """Every trainable weight is re-drawn (whatever it held before): the same seed gives the same
    adapter, another seed another one where PEFT draws at random (IA3 starts at ones, LoRA's B at zero)."""
    model = build(CONFIGS[peft_type]())
    assert method_of(model) is PEFT_METHODS[peft_type]
    draws = []
    for seed in (1, 1, 2):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5)
        initialize_adapter(model, seed)
        draws.append(adapter_weights(model))
    assert draws[0] and all(torch.equal(draws[0][n], draws[1][n]) for n in draws[0])
    random = [n for n in draws[0] if peft_type != "IA3" and "lora_B" not in n]
    assert all(not torch.equal(draws[0][n], draws[2][n]) for n in random) and (random or peft_type == "IA3")


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_the_traits_match_the_model(peft_type):
    model, method = build(CONFIGS[peft_type]()), PEFT_METHODS[peft_type]
    assert method.virtual_tokens == model.active_peft_config.is_prompt_learning
    assert method.prefix_in_cache == (peft_type == "PREFIX_TUNING")
    assert (switchable_layers(model) == []) == method.virtual_tokens  # prompt learning: no layers to switch
    assert method.config_class == f"peft.{type(model.active_peft_config).__name__}"
    assert method_name(type(model.active_peft_config).__name__) == method.name


def test_an_unknown_method_is_one_line_naming_the_supported_ones():
    supported = "peft.LoraConfig, peft.IA3Config, peft.PromptTuningConfig, peft.PrefixTuningConfig"
    with pytest.raises(AdapterError) as info:
        peft_method(LoHaConfig())
    assert user_error_message(info.value) == (
        f"--model.peft peft.LoHaConfig: PEFT method 'LOHA' is not supported (supported: {supported})")
    loha = build(LoHaConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(AdapterError, match="'LOHA' is not supported"):  # no silent skip of the seeded init
        initialize_adapter(loha, 0)


def test_the_private_peft_names_exist():
    """The registry's private PEFT attributes, on the installed PEFT (checked on PEFT_CHECKED)."""
    missing = []
    for class_path, attribute in PEFT_PRIVATE_NAMES:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        if not (hasattr(cls, attribute) or attribute in cls.__init__.__code__.co_names):
            missing.append(f"{class_path}.{attribute}")
    assert missing == [], f"PEFT {peft.__version__} (checked: {PEFT_CHECKED}) changed {missing}"


def test_the_adapter_switch_equals_peft_disable_adapter():
    """Flipping ``_disable_adapters`` is PEFT's own adapter-off output (LoRA layers and a modules_to_save copy)."""
    model = build(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    kinds = {type(layer).__name__ for layer in switchable_layers(model)}
    assert {"Linear", "ModulesToSaveWrapper"} <= kinds
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        with AdapterSwitch(model).off():
            switched = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference)
    assert torch.equal(switched, reference) and torch.equal(after, adapted)
