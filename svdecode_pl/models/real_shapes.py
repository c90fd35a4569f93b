"""Random-weight models with the exact shapes of real checkpoints, built offline, few layers.

Qwen2.5-0.5B and Llama-3.2-1B as in their hub ``config.json`` (hidden size, heads, grouped KV heads,
intermediate size, RoPE, norms, logit count, tying), with ``num_layers`` layers instead of 24 / 16.
The tokenizer has the real ones' *shape*, not their merges:

- the same number of entries and the real ids of every special token: the BPE trained on the
  built-in corpus (:func:`svdecode_pl.models.tiny.train_bpe`, 2,048 entries) is padded with
  unreachable placeholder entries up to the first special id (151,643 for Qwen2.5, 128,000 for
  Llama 3), then the special tokens follow at their real ids;
- the real BOS/EOS/pad handling: Qwen2.5 adds no BOS, EOS and pad are ``<|endoftext|>`` (151643);
  Llama 3 prepends ``<|begin_of_text|>`` (128000) to every encoding, EOS is ``<|end_of_text|>``
  (128001), and there is no pad token (the loader then pads with EOS, as for the real one).

What differs from the real tokenizers: the merges (text splits into the tiny corpus's ~2,000
tokens, not into the real 151,643 / 128,000, so sequence lengths differ by a small factor); the
NFC normalizer of Qwen2.5 and Llama 3's ``\\p{N}{1,3}`` digit grouping are not reproduced; the
chat template is absent. None of these change a tensor's width; lengths are what the batch sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from svdecode_pl.models.tiny import save_model_dir, train_bpe

QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN25_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])

#: The hub configs (model_type, shapes, RoPE, tying, special ids), less the layer count.
REAL_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936, use_sliding_window=False,
        sliding_window=32768, max_window_layers=24, bos_token_id=151643, eos_token_id=151643,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=128256,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    ),
}


def build_shape_tokenizer(model_type: str):
    """A tokenizer with the real one's length, special ids and BOS/EOS/pad handling (module doc)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    first_special, special, added = (151643, QWEN25_SPECIAL, QWEN25_ADDED) if model_type == "qwen2" else \
        (128000, LLAMA3_SPECIAL, [])
    data = json.loads(train_bpe(special_tokens=()).to_str())
    vocab = data["model"]["vocab"]
    # placeholders no merge produces: the entry count and the special ids become the real ones
    vocab.update({f"<|svdecode_unused_{i}|>": i for i in range(len(vocab), first_special)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    if model_type == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       model_max_length=131072)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, first_special)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
                                   model_max_length=131072)


def real_shape_config(shape: str, num_layers: int = 2, **overrides):
    """The transformers config of ``shape`` (a :data:`REAL_SHAPES` key) with ``num_layers`` layers;
    ``overrides`` replace fields (e.g. ``tie_word_embeddings=False``, or a tiny hidden size)."""
    from transformers import AutoConfig

    fields = dict(REAL_SHAPES[shape], num_hidden_layers=num_layers, **overrides)
    if fields["model_type"] == "qwen2":
        fields["max_window_layers"] = num_layers
    return AutoConfig.for_model(**fields)


def build_real_shape_model(path: str | Path, shape: str, num_layers: int = 2, seed: int = 0,
                           embedding_std: float = 0.25, dtype: torch.dtype = torch.float32,
                           **overrides) -> Path:
    """Build and save a random-weight ``shape`` model with its shape tokenizer into ``path``.

    ``embedding_std`` widens the embeddings as for the tiny models (HF's 0.02 keeps every logit
    near 0, so no adapter could move a random model); weights are saved in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    config = real_shape_config(shape, num_layers, **overrides)
    tokenizer = build_shape_tokenizer(config.model_type)
    config.pad_token_id = tokenizer.pad_token_id
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    finally:
        torch.random.set_rng_state(state)
    return save_model_dir(model, tokenizer, Path(path))
