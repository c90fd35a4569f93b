"""Token ids of prompts and answers, split as lm-evaluation-harness splits them; shared by
the tasks (items, warm-start examples) and the judges."""

from __future__ import annotations


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``; for a fast tokenizer straight from its Rust backend
    (the same call transformers makes, without building attention masks and encodings objects,
    which was half the tokenization time of TruthfulQA MC)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))):
        return tokenizer(texts)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=True)]


def encode_pairs(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of a context and its continuations, split as lm-evaluation-harness does: trailing
    context whitespace moves to the continuation, each pair is encoded whole (one batched call),
    and a continuation is what follows the separately encoded context. The tokenizer's own special
    tokens are kept (a BOS for Llama 3, none for Qwen2), as lm-eval keeps them."""
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    encoded = token_ids(tokenizer, [stripped] + [stripped + moved + c for c in continuations])
    context_ids = encoded[0]
    return context_ids, [whole[len(context_ids) :] for whole in encoded[1:]]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """:func:`encode_pairs` for one continuation."""
    context_ids, (continuation_ids,) = encode_pairs(tokenizer, context, [continuation])
    return context_ids, continuation_ids


def encode_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its target as a continuation.

    The prompt's ids are exactly those the model is given when it generates (``tokenizer(prompt)``,
    special tokens included), so warm-start, log-likelihood and generation share one context; the
    target is what follows them in the encoding of the whole text. (lm-eval's convention, which
    moves the prompt's trailing newline into the continuation, would score a context that
    generation never sees: Qwen2's tokenizer merges ``":\\n"`` into one token.) If the whole
    text's encoding does not start with the prompt's, the target is encoded on its own.
    """
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + target)["input_ids"]
    if whole[: len(context)] == context and len(whole) > len(context):
        return context, whole[len(context) :]
    return context, tokenizer(target, add_special_tokens=False)["input_ids"]
