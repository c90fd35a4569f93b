"""Commonsense ``loglik`` scoring: shared work vs one forward pass per (prompt, label) pair.

    python benchmarks/commonsense_loglik.py [--arch qwen2|llama] [--limit-test 100] [--repeats 2]
        [--device cpu|cuda] [--datasets boolq piqa ARC-Challenge ARC-Easy openbookqa]

Items of kind ``"multiple_choice"`` (``CommonsenseDataModule(protocol="loglik")`` on
../shared/data/commonsense) are scored as ``svdecode test`` scores them: the Alpaca header all
prompts share is cached once, and each question's prompt is encoded once, followed by all its
labels' continuations (``svdecode_pl.scoring.loglik.score_many``). The reference runs one whole forward
pass per (prompt, label) pair. Prints both times (fastest of ``--repeats``, alternating), the
tokens each feeds the model, the largest score difference and both accuracies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from svdecode_pl.evaluation.evaluator import score_items
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.models.tiny import TINY_MODELS, build_tiny_model
from svdecode_pl.scoring.job import PrefixCache
from svdecode_pl.tasks.commonsense import CommonsenseDataModule
from svdecode_pl.utils.allocator import keep_freed_memory
from svdecode_pl.utils.profiling import profiling

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "commonsense"
TINY = {"qwen2": "svdecode-tiny-256", "llama": "svdecode-tiny-256-llama"}


def shared(model: torch.nn.Module, loader, pad_id: int) -> tuple[list[list[float]], float, int]:
    """Scores of every label of every question as ``svdecode test`` computes them."""
    prefix, scores = PrefixCache(), []
    start = time.perf_counter()
    with profiling() as profile, torch.inference_mode():
        for items in loader:
            scores += [record.scores["plain"] for record in score_items(model, items, None, 256, pad_id, prefix)]
    return scores, time.perf_counter() - start, profile.tokens


def per_pair(model: torch.nn.Module, items: list[dict]) -> tuple[list[list[float]], float, int]:
    """The same scores from one forward pass of (prompt + label) per pair."""
    scores, tokens = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for item in items:
            context = item.context_ids
            row = []
            for continuation in item.continuation_ids:
                ids = torch.tensor([context + continuation], device=model.device)
                tokens += ids.numel()
                logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
                target = torch.tensor(continuation, device=model.device)[:, None]
                row.append(torch.log_softmax(logits, -1).gather(-1, target).double().sum().item())
            scores.append(row)
    return scores, time.perf_counter() - start, tokens


def accuracy(scores: list[list[float]], items: list[dict]) -> float:
    hits = [item.labels[max(range(len(row)), key=row.__getitem__)] for row, item in zip(scores, items)]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2", choices=sorted(TINY))
    parser.add_argument("--model-dir", help="an HF causal LM dir instead of the tiny model")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--datasets", nargs="+", default=["boolq", "piqa", "ARC-Challenge", "ARC-Easy", "openbookqa"])
    parser.add_argument("--limit-test", type=int, default=100, help="questions per set")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the svdecode command does (both sides profit)
    if not args.data_dir.exists():
        sys.exit(f"{args.data_dir}: not found (the shared data folder is needed for this benchmark)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = str(build_tiny_model(Path(tmp) / TINY[args.arch], **TINY_MODELS[TINY[args.arch]]))
        model = load_causal_lm(model_dir).to(args.device).eval()
        dm = CommonsenseDataModule(tokenizer=model_dir, datasets=args.datasets, data_dir=str(args.data_dir),
                                   limit_test=args.limit_test, protocol="loglik")
        dm.setup("test")
        loader = dm.scoring_dataloader("test")
        items = list(loader.dataset)
        best: dict[str, tuple] = {}
        for _ in range(args.repeats):
            for name, run in (("shared", lambda: shared(model, loader, dm.tokenizer.pad_token_id)),
                              ("per pair", lambda: per_pair(model, items))):
                result = run()
                if name not in best or result[1] < best[name][1]:
                    best[name] = result
    (ours, our_seconds, our_tokens), (ref, ref_seconds, ref_tokens) = best["shared"], best["per pair"]
    diff = max(abs(a - b) for row, ref_row in zip(ours, ref) for a, b in zip(row, ref_row))
    pairs = sum(len(item.continuation_ids) for item in items)
    print(f"\ncommonsense loglik, {len(items)} questions ({pairs} labels) of {', '.join(args.datasets)},"
          f" model {args.model_dir or args.arch + ' hidden 256, 4 layers'}, fastest of {args.repeats}")
    print(f"{'':<34}{'seconds':>9}{'tokens fed':>12}{'accuracy':>10}")
    print(f"{'shared (svdecode-pl)':<34}{our_seconds:>9.2f}{our_tokens:>12,}{accuracy(ours, items):>10.4f}")
    print(f"{'one pass per (prompt, label)':<34}{ref_seconds:>9.2f}{ref_tokens:>12,}{accuracy(ref, items):>10.4f}")
    print(f"speed-up {ref_seconds / our_seconds:.2f}x, tokens {ref_tokens / our_tokens:.2f}x fewer;"
          f" largest |score difference| {diff:.1e}")


if __name__ == "__main__":
    main()
