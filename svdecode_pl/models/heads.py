"""The output head applied where it is needed: at target positions only, in chunks, with
batch-independent matrix products; and the PEFT views (adapter off, base model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from svdecode_pl.utils.profiling import timed

#: Fewest rows a matrix product gets here. BLAS takes another code path (another summation
#: order) for a few rows (up to 11 with MKL on this machine), so a row's result would depend on
#: how many rows share its product; from this size on it does not (``tests/test_scoring.py``).
MIN_GEMM_ROWS = 64


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of (N, H) hidden states; a product of fewer than :data:`MIN_GEMM_ROWS`
    rows gets zero rows added, so a row's logits do not depend on which rows share the call."""
    with timed("output head"):
        if hidden.shape[0] >= MIN_GEMM_ROWS:
            return head(hidden).float()
        padded = torch.cat([hidden, hidden.new_zeros(MIN_GEMM_ROWS - hidden.shape[0], hidden.shape[1])])
        return head(padded)[: hidden.shape[0]].float()


def chunked_logits(head: nn.Module, hidden: torch.Tensor, chunk_tokens: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 logits of (N, H) hidden states, ``chunk_tokens`` rows at a time (:func:`head_logits`)."""
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
        yield rows, head_logits(head, hidden[rows])


def logits_into(head: nn.Module, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Float32 logits of (N, H) hidden states written into ``out`` (N, V): a linear head in
    float32 writes them there directly, so a loop over chunks allocates nothing of size V
    (fresh multi-MB tensors cost page faults on every chunk)."""
    if isinstance(head, nn.Linear) and head.weight.dtype == hidden.dtype == out.dtype:
        torch.mm(hidden, head.weight.t(), out=out)
        return out if head.bias is None else out.add_(head.bias)
    return out.copy_(head(hidden))


def target_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Final hidden states at the positions that predict target tokens, with the targets.

    Returns ((N, H) hidden states, (N,) target ids, the output head). Virtual tokens that a
    prompt-learning adapter puts in front of the sequence are dropped, so adapted and base
    outputs are aligned to the same real tokens.
    """
    with hidden_states_as_logits(model) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    hidden = hidden[:, hidden.shape[1] - input_ids.shape[1] :]
    predict = target_mask[:, 1:].bool()
    return hidden[:, :-1][predict], input_ids[:, 1:][predict], head


def is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (with its adapter layers), or the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def adapter_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which ``model`` computes the pre-trained model's outputs (adapter off)."""
    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()


@contextlib.contextmanager
def hidden_states_as_logits(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model with its output head replaced by identity, and yield the head.

    The forward pass then returns final hidden states (post norm) in place of the logits, so
    callers apply the head only to the positions they need, chunk by chunk: logits of a whole
    batch at a 152k vocabulary are never materialised.
    """
    inner = hf_model(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)


def output_vocab_size(model: nn.Module) -> int:
    """Number of logits the model produces (may exceed the tokenizer's size, e.g. Qwen2.5)."""
    return int(hf_model(model).config.get_text_config().vocab_size)
