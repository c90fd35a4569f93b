"""Loading any HF causal LM and its tokenizer by hub id, local directory or built-in tiny name."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import torch
from torch import nn

from svdecode_pl.models.family import MINIATURE_MODELS, resolve_miniature
from svdecode_pl.models.tiny import TINY_MODELS, resolve_tiny_model
from svdecode_pl.utils.errors import loading_model

DType = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_name_or_path(name_or_path: str) -> str:
    """A built-in model name (random-init tiny or a pre-trained miniature of the family) becomes its local
    directory, built on first use."""
    if name_or_path in TINY_MODELS:
        return str(resolve_tiny_model(name_or_path))
    if name_or_path in MINIATURE_MODELS:
        return str(resolve_miniature(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    with loading_model(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_name_or_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: DType = "float32", attn_implementation: str | None = None) -> nn.Module:
    """Any Hugging Face causal LM by hub id or local path (or a built-in tiny model name);
    ``attn_implementation`` None: transformers' default."""
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    with loading_model(name_or_path):
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        return AutoModelForCausalLM.from_pretrained(resolve_name_or_path(name_or_path), dtype=torch_dtype, **extra)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and special tokens: two tokenizers with the same
    fingerprint map text to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps([vocab, tokenizer.all_special_tokens], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
