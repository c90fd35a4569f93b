"""Real shapes on the CPU (issue 21, item 2): the shape tokenizers carry the real lengths, special
ids and BOS/EOS/pad handling; the configs are the hub's; the logit counts are the real ones; and at
Qwen2.5's 151,936 logits the memory that test, generation and predict keep does not grow with the
number of questions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from svdecode_pl.models.loading import load_causal_lm, load_tokenizer
from svdecode_pl.models.real_shapes import build_real_shape_model, build_shape_tokenizer, real_shape_config

ROOT = Path(__file__).resolve().parents[1]
#: Peak MB that 64 questions may add over 8 at the same batch (4 questions). The peak moves by about
#: +-50 MB from run to run whatever the count; intact, the growth measured -13 (MC test, predict) and
#: +9 MB (dynamic generation). One 7-row float32 block of 151,936 logits (4.25 MB) kept per question,
#: planted in the Evaluator, grew the MC test and predict by 190 and 192 MB: it fails.
QUESTIONS = (8, 64)
GROWTH_MARGIN_MB = 150.0


def load_benchmark():
    spec = importlib.util.spec_from_file_location("real_shapes_benchmark", ROOT / "benchmarks" / "real_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_type, length, bos, eos, pad, first_special", [
    ("qwen2", 151665, None, 151643, 151643, "<|endoftext|>"),
    ("llama", 128256, 128000, 128001, 128001, "<|begin_of_text|>"),
])
def test_shape_tokenizer_has_the_real_length_ids_and_bos(tmp_path, model_type, length, bos, eos, pad, first_special):
    tokenizer = build_shape_tokenizer(model_type)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))  # pads with EOS where the model has no pad (Llama 3)
    assert len(tokenizer) == length
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (bos, eos, pad)
    assert tokenizer.convert_tokens_to_ids(first_special) == (bos or eos)
    ids = tokenizer("Q: What is the sky?\nA: blue")["input_ids"]
    assert (ids[0] == bos) == (model_type == "llama") and ids.count(bos) <= 1
    assert max(ids[1:]) < 2048  # ordinary text never reaches a placeholder entry
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Q: What is the sky?\nA: blue"


def test_real_shape_configs_are_the_hubs():
    qwen, llama = real_shape_config("qwen2.5-0.5b"), real_shape_config("llama-3.2-1b")
    assert (qwen.hidden_size, qwen.num_attention_heads, qwen.num_key_value_heads, qwen.intermediate_size,
            qwen.vocab_size, qwen.tie_word_embeddings, qwen.num_hidden_layers) == (896, 14, 2, 4864, 151936, True, 2)
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads, llama.intermediate_size,
            llama.vocab_size, llama.head_dim) == (2048, 32, 8, 8192, 128256, 64)
    rope = getattr(llama, "rope_parameters", None) or llama.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert not real_shape_config("llama-3.2-1b", tie_word_embeddings=False).tie_word_embeddings


def test_tiny_hidden_model_has_the_real_logit_count(tmp_path):
    path = build_real_shape_model(tmp_path / "m", "llama-3.2-1b", num_layers=1, hidden_size=64, head_dim=16,
                                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)
    model, tokenizer = load_causal_lm(str(path)), load_tokenizer(str(path))
    ids = torch.tensor([tokenizer("Q: a?")["input_ids"]])
    assert model(ids).logits.shape[-1] == 128256
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_kept_memory_does_not_grow_with_questions(tmp_path, monkeypatch):
    """8 vs 64 test questions at eval batch 4 (hidden 64, 2 layers, Qwen2.5's vocabulary and
    tokenizer shape): each phase's peak RSS grows by less than GROWTH_MARGIN_MB. glibc's allocator
    is left as it is (SVDECODE_KEEP_FREED_MEMORY=0): with freed blocks kept in the heap, the peak
    moves by a few hundred MB from run to run with how the heap fragments, whatever the question
    count (benchmarks/README.md), which would hide what the code itself keeps."""
    monkeypatch.setenv("SVDECODE_KEEP_FREED_MEMORY", "0")
    bench = load_benchmark()
    shape, overrides = bench.SHAPES["qwen2.5-vocab-hidden64"]
    model = build_real_shape_model(tmp_path / "model", shape, num_layers=2, **overrides)
    phases = ("test_mc", "gen_dynamic", "predict")
    results = bench.measure(model, tmp_path / "work", questions=QUESTIONS, new_tokens=4, phases=phases,
                            verbose=False)
    for count in QUESTIONS:  # the question count really changed
        written = json.loads((tmp_path / "work" / f"test_mc_{count}" / "results.json").read_text())
        assert written["n_examples"] == count
        lines = (tmp_path / "work" / f"predict_{count}" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == count
    growth = bench.growth(results, QUESTIONS)
    assert set(growth) == set(phases)
    assert all(value < GROWTH_MARGIN_MB for value in growth.values()), (growth, results)
