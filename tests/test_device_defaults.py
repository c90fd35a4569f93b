"""The evaluation defaults chosen from the device (issue 21, item 3): CPU keeps exact packing;
CUDA sizes padded batches from free memory; the choice is printed once and lands in results.json."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from svdecode_pl.models.device_defaults import (
    MAX_SCORE_TOKENS,
    MIN_GENERATION_BATCH,
    MIN_SCORE_TOKENS,
    choose_evaluation_defaults,
    generation_bytes_per_sequence,
    scoring_bytes_per_token,
)

GiB = 2**30
#: Qwen2.5-7B's shape (28 layers, 4 KV heads of 128, 152,064 logits).
QWEN_7B = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)


def test_cpu_keeps_exact_packing() -> None:
    chosen = choose_evaluation_defaults("cpu", None, QWEN_7B)
    assert chosen.score_batch_tokens == 0
    assert chosen.generation_batch == 16
    assert chosen.device == "cpu" and "packing" in chosen.describe()
    assert not chosen.compiled_decoding and "decoding eager" in chosen.describe()  # compiling costs more here


def test_cuda_without_memory_reading_falls_back_to_packing() -> None:
    assert choose_evaluation_defaults("cuda:0", None, QWEN_7B).score_batch_tokens == 0


@pytest.mark.parametrize("free_gib", [2, 20, 60, 120])
def test_cuda_budgets_fit_half_the_free_memory(free_gib: int) -> None:
    chosen = choose_evaluation_defaults("cuda:0", free_gib * GiB, QWEN_7B, dtype_bytes=2)
    assert chosen.device == "cuda"
    assert chosen.compiled_decoding and "decoding compiled (static cache, CUDA graphs)" in chosen.describe()
    assert MIN_SCORE_TOKENS <= chosen.score_batch_tokens <= MAX_SCORE_TOKENS
    assert chosen.score_batch_tokens & (chosen.score_batch_tokens - 1) == 0  # a power of two
    if chosen.score_batch_tokens > MIN_SCORE_TOKENS:  # not clamped up: the estimate fits the share
        assert chosen.score_batch_tokens * scoring_bytes_per_token(QWEN_7B) <= free_gib * GiB / 2
    if chosen.generation_batch > MIN_GENERATION_BATCH:
        assert chosen.generation_batch * generation_bytes_per_sequence(QWEN_7B) <= free_gib * GiB / 2


def test_cuda_budgets_grow_with_free_memory() -> None:
    small = choose_evaluation_defaults("cuda", 10 * GiB, QWEN_7B)
    large = choose_evaluation_defaults("cuda", 100 * GiB, QWEN_7B)
    assert large.score_batch_tokens > small.score_batch_tokens
    assert large.generation_batch > small.generation_batch
    record = large.as_dict()
    assert record["free_memory_bytes"] == 100 * GiB and record["attn_implementation"] == "sdpa"


def _test_run(run_dir, *extra: str) -> dict:
    """A `svdecode test` of the tiny model without adapter (a few seconds on a CPU)."""
    import json
    from pathlib import Path

    from svdecode_pl.cli.entry import run_cli

    root = Path(__file__).resolve().parents[1]
    run_cli(["test", "--config", str(root / "configs" / "quickstart.yaml"),
             "--config", str(root / "configs" / "peft" / "none.yaml"),
             "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
             "--data.synthetic_questions", "8", "--data.eval_batch_size", "4", *extra])
    return json.loads((run_dir / "results.json").read_text())


def test_unset_options_are_chosen_printed_once_and_recorded(tmp_path, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO):
        results = _test_run(tmp_path)
    chosen = results["evaluation_defaults"]
    assert chosen["device"] == "cpu" and chosen["score_batch_tokens"] == 0
    assert chosen["attn_implementation"] == "sdpa" and chosen["compiled_decoding"] is False
    assert sum("evaluation defaults for cpu" in r.getMessage() for r in caplog.records) == 1


def test_options_set_by_the_user_are_kept(tmp_path) -> None:
    results = _test_run(tmp_path, "--model.score_batch_tokens", "512")
    assert "evaluation_defaults" not in results
