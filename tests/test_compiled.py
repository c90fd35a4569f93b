"""Compiled decoding (issue 28, item 3): ``generation.compile`` resolved by device, static caches and
fixed-width masks that give the eager loop's tokens (greedy, sampling, beams; one and two passes),
caches reused across batches, and a real ``torch.compile`` on the CPU with eager decoding's tokens."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from conftest import PROMPT_TEXTS, peft_model

from svdecode_pl.decoding import compiled, mixed_dynamic
from svdecode_pl.decoding.generation import (
    GenerationSettings,
    decoding_compiled,
    generate_sequences,
    generation_config,
)
from svdecode_pl.models.heads import hf_model, output_vocab_size
from svdecode_pl.steering.vector import SteeringVector
from svdecode_pl.utils.errors import OptionError

pytestmark = pytest.mark.usefixtures("one_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_compile_setting_resolves_by_device(flat_model_dir, monkeypatch) -> None:
    model = peft_model(flat_model_dir)
    auto = GenerationSettings()
    assert not decoding_compiled(model, auto, CPU) and decoding_compiled(model, auto, CUDA)
    assert decoding_compiled(model, dataclasses.replace(auto, compile=True), CPU)
    assert not decoding_compiled(model, dataclasses.replace(auto, compile=False), CUDA)
    with pytest.warns(UserWarning, match="decoding eagerly, prompt learning"):
        assert not decoding_compiled(peft_model(flat_model_dir, "prompt_tuning"),
                                     dataclasses.replace(auto, compile=True), CPU)
    monkeypatch.setattr(type(hf_model(model)), "_can_compile_fullgraph", False)
    with pytest.warns(UserWarning, match="does not declare a compilable forward"):
        assert not decoding_compiled(model, dataclasses.replace(auto, compile=True), CPU)
    monkeypatch.undo()
    with pytest.raises(OptionError, match="compile must be auto, true or false"):
        GenerationSettings(compile="yes")
    config = generation_config(auto, [0], 0, CPU, prompt_length=300)
    assert config.cache_implementation == "static" and config.max_cache_len == 768  # 300 + 256 new, in steps of 256
    assert config.compile_config.mode == "default" and config.compile_config._compile_all_devices
    assert generation_config(auto, [0], 0, CUDA).compile_config.mode == "reduce-overhead"
    assert generation_config(auto, [0], 0).cache_implementation is None


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beams"])
@pytest.mark.parametrize("adapter", ["lora", "lora-two-pass", "ia3"])
def test_static_cache_loop_equals_eager_loop(flat_model_dir, flat_tokenizer, prompts, eager_steps, monkeypatch,
                                             strategy, adapter) -> None:
    """Dynamic decoding through static caches (steps uncompiled here): the eager loop's tokens; a
    second batch of the same rows reuses the same cache objects (the buffers compiled graphs read)."""
    if adapter == "lora-two-pass":
        monkeypatch.setattr(mixed_dynamic, "mixed_batch_support", lambda model: (False, "forced"))
    model = peft_model(flat_model_dir, adapter.split("-")[0])
    settings = GenerationSettings(max_new_tokens=10, stop=[], do_sample=strategy == "sample", seed=3,
                                  num_beams=3 if strategy == "beams" else 1)
    vector = SteeringVector(None, 300.0, mode="dynamic")
    on = dataclasses.replace(settings, compile=True)
    assert torch.equal(generate_sequences(model, flat_tokenizer, prompts, on, vector),
                       generate_sequences(model, flat_tokenizer, prompts, settings, vector))
    held = dict(compiled._held(hf_model(model).get_decoder()))
    assert set(held) == ({"mixed"} if adapter == "lora" else {"adapted", "base"})
    swapped = [prompts[1], prompts[0], *prompts[2:]]
    assert torch.equal(generate_sequences(model, flat_tokenizer, swapped, on, vector),
                       generate_sequences(model, flat_tokenizer, swapped, settings, vector))
    assert all(compiled._held(hf_model(model).get_decoder())[slot] is cache for slot, cache in held.items())


def test_static_cache_grows_and_follows_the_rows(flat_model_dir) -> None:
    model = peft_model(flat_model_dir)
    first = compiled.static_cache(model, "base", 4, 100)
    assert compiled.cache_capacity(first) == compiled.CACHE_LENGTH_STEP
    assert compiled.static_cache(model, "base", 4, 10) is first  # unused yet: fits anything
    longer = compiled.static_cache(model, "base", 4, compiled.CACHE_LENGTH_STEP + 1)
    assert longer is not first and compiled.cache_capacity(longer) == 2 * compiled.CACHE_LENGTH_STEP
    assert compiled.cache_capacity(compiled.static_cache(model, "base", 4, 5)) == 2 * compiled.CACHE_LENGTH_STEP


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                    reason="torch.compile on the CPU builds C++ kernels: no C++ compiler found")
def test_compiled_decoding_equals_eager(flat_model_dir, flat_tokenizer, prompts) -> None:
    """``torch.compile`` (inductor, C++ kernels built by gcc) of ``generate``'s steps and of the
    dynamic loop's step: greedy tokens equal eager decoding's, plain, static- and dynamic-steered
    (one compiled shape each; about 30 s on a quiet 2-core CPU)."""
    from torch._dynamo.utils import counters

    model = peft_model(flat_model_dir)
    direction = torch.randn(output_vocab_size(model), generator=torch.Generator().manual_seed(2))
    settings = GenerationSettings(max_new_tokens=10, stop=[])
    graphs = counters["stats"]["unique_graphs"]
    for vector in (None, SteeringVector(direction, 0.5), SteeringVector(None, 300.0, mode="dynamic")):
        eager = generate_sequences(model, flat_tokenizer, prompts, settings, vector)
        assert torch.equal(generate_sequences(model, flat_tokenizer, prompts,
                                              dataclasses.replace(settings, compile=True), vector), eager)
    assert counters["stats"]["unique_graphs"] > graphs  # something was compiled
    assert len(PROMPT_TEXTS) == len(prompts)
