"""Real shapes on the CPU (issue 21, item 2): the shape tokenizers carry the real lengths, special
ids and BOS/EOS/pad handling; the configs are the hub's; the logit counts are the real ones.
(Peak memory against the number of questions: ``benchmarks/real_shapes.py``; not yet a test, see
benchmarks/README.md.)"""

from __future__ import annotations

import pytest
import torch

from svdecode_pl.models.loading import load_causal_lm, load_tokenizer
from svdecode_pl.models.real_shapes import build_real_shape_model, build_shape_tokenizer, real_shape_config


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
