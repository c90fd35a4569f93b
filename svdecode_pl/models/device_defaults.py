"""Evaluation defaults chosen from the device, for the options a user leaves unset.

A plain function of (device type, free memory, model config) so that each device's choice is
unit-tested without the device. CPU keeps the exact packing (scores independent of which
questions share a pass); CUDA uses length-sorted padded batches sized from free memory, because a
packed pass runs one attention call per question and layer, which on a GPU is a kernel launch each.

Decoding is compiled (a static KV cache, a ``torch.compile``'d step replayed as a CUDA graph) on
CUDA, where a small batch's step is bound by Python and kernel launches; on the CPU compiling costs
more (tens of seconds per shape) than the steps it shortens.

The CUDA budgets are estimates from the model's shapes (not yet measured on a GPU; see
``benchmarks/device_check.py``), deliberately using only half the free memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: How far a question's summed log-probability may move with the questions that share its pass, on
#: a CPU with more than one thread: torch splits elementwise kernels (SiLU's exp) and reductions
#: among threads at boundaries that depend on the tensor's size, and a vectorised and a scalar tail
#: round differently (measured on the tiny models: 0 at 1 and 2 threads, up to 3.4e-5 at 3, 1.5e-5 at
#: 4, 3.1e-5 at 8; a sum over 152k entries already differs at 2). Bit for bit at one thread.
PACKING_TOLERANCE = 1e-4

#: Share of the free device memory the evaluation's transient tensors may take.
MEMORY_SHARE = 0.5
#: Tokens of one generated sequence assumed when sizing the generation batch (prompt + answer).
GENERATION_SEQUENCE_TOKENS = 1024
CPU_GENERATION_BATCH = 16
MIN_SCORE_TOKENS, MAX_SCORE_TOKENS = 1024, 65536
MIN_GENERATION_BATCH, MAX_GENERATION_BATCH = 8, 256


@dataclass(frozen=True)
class EvaluationDefaults:
    """The choice, as recorded in results.json (``evaluation_defaults``)."""

    device: str
    score_batch_tokens: int
    """0: exact packing (CPU); N > 0: padded batches of up to N tokens."""
    generation_batch: int
    """Advised questions per generation batch (the task's ``eval_batch_size``)."""
    attn_implementation: str
    free_memory_bytes: int | None
    reason: str
    compiled_decoding: bool = False
    """Decoding compiled where ``generation.compile`` is ``auto`` (:func:`compiled_decoding_default`)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log."""
        tokens = self.score_batch_tokens
        scoring = "exact packing" if tokens == 0 else f"padded batches of {tokens} tokens"
        decoding = "compiled (static cache, CUDA graphs)" if self.compiled_decoding else "eager"
        return (f"evaluation defaults for {self.device}: scoring by {scoring}, generation batch "
                f"{self.generation_batch}, attention {self.attn_implementation}, decoding {decoding} "
                f"({self.reason})")


def _shape(config: Any) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, layers, kv heads, head dim, vocab) of an HF config."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return hidden, intermediate, int(config.num_hidden_layers), kv_heads, head_dim, int(config.vocab_size)


def _power_of_two_floor(value: float, low: int, high: int) -> int:
    """The largest power of two <= value, clamped to [low, high]."""
    result = low
    while result * 2 <= min(value, high):
        result *= 2
    return result


def scoring_bytes_per_token(config: Any, dtype_bytes: int = 2, chunk_tokens: int = 256) -> float:
    """Transient bytes of one scored token: its keys/values in every layer plus one layer's
    activations (hidden, q/k/v/o, the MLP's two intermediate tensors); the chunked head's float32
    logits (``chunk_tokens x vocab``) are a fixed cost shared by the batch, spread over it here."""
    hidden, intermediate, layers, kv_heads, head_dim, vocab = _shape(config)
    cache = 2 * layers * kv_heads * head_dim * dtype_bytes
    activations = (6 * hidden + 3 * intermediate) * dtype_bytes
    return cache + activations + chunk_tokens * vocab * 4 / MIN_SCORE_TOKENS


def generation_bytes_per_sequence(config: Any, dtype_bytes: int = 2) -> float:
    """KV-cache bytes of one generated sequence of ``GENERATION_SEQUENCE_TOKENS`` tokens, doubled
    for dynamic steering (adapted and base states), plus its float32 logits row."""
    _, _, layers, kv_heads, head_dim, vocab = _shape(config)
    return 2 * (2 * layers * kv_heads * head_dim * dtype_bytes * GENERATION_SEQUENCE_TOKENS) + 2 * vocab * 4


def compiled_decoding_default(device: str) -> bool:
    """Whether decoding compiles when ``generation.compile`` is ``auto``: on CUDA only."""
    return str(device).split(":")[0] == "cuda"


def choose_evaluation_defaults(
    device: str, free_memory_bytes: int | None, model_config: Any, dtype_bytes: int = 2
) -> EvaluationDefaults:
    """The scoring mode and budget, the generation batch and the attention implementation."""
    device_type = device.split(":")[0]
    if device_type != "cuda" or not free_memory_bytes:
        why = f"CPU: exact packing, scores independent of the batch to {PACKING_TOLERANCE:.0e} (bit for bit at one " \
            "thread)" if device_type != "cuda" else \
            "CUDA with unknown free memory: exact packing"
        return EvaluationDefaults(device_type, 0, CPU_GENERATION_BATCH, "sdpa", free_memory_bytes, why,
                                  compiled_decoding_default(device_type))
    budget = free_memory_bytes * MEMORY_SHARE
    score_tokens = _power_of_two_floor(budget / scoring_bytes_per_token(model_config, dtype_bytes),
                                       MIN_SCORE_TOKENS, MAX_SCORE_TOKENS)
    batch = _power_of_two_floor(budget / generation_bytes_per_sequence(model_config, dtype_bytes),
                                MIN_GENERATION_BATCH, MAX_GENERATION_BATCH)
    why = f"CUDA: padded batches sized to {MEMORY_SHARE:.0%} of {free_memory_bytes / 2**30:.1f} GiB free"
    return EvaluationDefaults("cuda", score_tokens, batch, "sdpa", free_memory_bytes, why, True)


def free_memory_of(device: Any) -> int | None:
    """Free bytes on a CUDA device (None elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
