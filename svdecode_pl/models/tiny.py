"""Tiny, real Hugging Face causal LMs built offline, for the embedded default and the tests.

The model is a genuine Qwen2 (or Llama) architecture with random weights; the tokenizer is a
byte-level BPE trained by the `tokenizers` library on a small built-in corpus with Qwen2's own
pre-tokenizer. Both save with `save_pretrained` and load back with `AutoModelForCausalLM` /
`AutoTokenizer`, so every code path is the one a hub model takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import torch

Architecture = Literal["qwen2", "llama"]

#: Names that resolve to a built-in tiny model instead of a hub id or a local path.
TINY_MODELS: dict[str, dict] = {
    "svdecode-tiny": dict(architecture="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    "svdecode-tiny-llama": dict(architecture="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    "svdecode-tiny-256": dict(architecture="qwen2", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2),
    "svdecode-tiny-256-llama": dict(architecture="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2),
}

_EOS = "<|endoftext|>"
# Qwen2's pre-tokenizer split; using it means Qwen2Tokenizer loads our tokenizer unchanged.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _corpus(words: list[str] | None = None) -> list[str]:
    """The primer and ``words`` (default: the first world's, on which every tiny model's tokenizer
    was trained: keep it, or their fingerprint changes)."""
    from svdecode_pl.corpus.primer import QA_PRIMER
    from svdecode_pl.corpus.worlds import SUPERSTITIONS

    words = SUPERSTITIONS.corpus_words() if words is None else words
    lines = [QA_PRIMER] + [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [f"Q: {w}?\nA: {w}." for w in words]
    return lines


def train_bpe(vocab_size: int = 2048, special_tokens: tuple[str, ...] = (_EOS,), words: list[str] | None = None):
    """A byte-level BPE (a ``tokenizers.Tokenizer``) trained on the built-in corpus (with ``words``,
    see :func:`_corpus`) with Qwen2's pre-tokenizer: any text encodes; frequent words get their own token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(words), trainer)
    return tok


def build_tokenizer(vocab_size: int = 2048, words: list[str] | None = None):
    """The tiny models' tokenizer: :func:`train_bpe` with ``<|endoftext|>`` as EOS and pad (``words``:
    a miniature's own world's words instead of the first world's)."""
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(vocab_size, words=words)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=_EOS, pad_token=_EOS)


def build_tiny_model(
    path: str | Path,
    architecture: Architecture = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    embedding_std: float = 0.25,
) -> Path:
    """Build and save a tiny model + tokenizer into ``path``; deterministic for a given seed.

    ``vocab_size`` pads the embedding matrix beyond the tokenizer (as Qwen2.5 does: 151,936
    logits for 151,665 tokens), for benchmarks at a real vocabulary size.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    n_vocab = max(vocab_size or 0, len(tokenizer))
    common = dict(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if architecture == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif architecture == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r} (expected 'qwen2' or 'llama')")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
        # HF's default init (std 0.02) bounds every logit near 0 after the final norm, so no
        # adapter could make a random tiny model confident; wider embeddings give the logits range.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    finally:
        torch.random.set_rng_state(generator_state)
    return save_model_dir(model, tokenizer, path)


def save_model_dir(model, tokenizer, path: Path) -> Path:
    """``save_pretrained`` of both into ``path``, whole or not at all (a concurrent builder may win)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.config.model_type == "llama":
        # Keep our byte-level BPE as it is: Llama's tokenizer class would rebuild it.
        cfg_file = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_file.write_text(json.dumps(cfg, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_cache() -> Path:
    return Path(os.environ.get("SVDECODE_CACHE", Path.home() / ".cache" / "svdecode_pl"))


def resolve_tiny_model(name: str) -> Path:
    """Path of a built-in tiny model, built on first use (atomically) in the cache directory."""
    spec = TINY_MODELS[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + b"v3").hexdigest()[:10]
    path = tiny_model_cache() / f"{name}-{key}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # transformers' save_pretrained writes weights on global rank 0 only: build outside
            # the process group, in a child process
            code = f"from svdecode_pl.models.tiny import build_tiny_model; build_tiny_model({str(path)!r}, **{spec!r})"
            subprocess.run([sys.executable, "-c", code], check=True)
        else:
            build_tiny_model(path, **spec)
    return path
