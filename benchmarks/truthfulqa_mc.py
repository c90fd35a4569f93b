"""TruthfulQA MC scoring: where our time goes, tokens fed, and whole runs against lm-evaluation-harness.

    python benchmarks/truthfulqa_mc.py [--arch qwen2 llama | --model-dir DIR] [--repeats 2] [--limit N]
        [--device cpu|cuda] [--score-batch-tokens N] [--lm-eval-python /tmp/lmeval/venv/bin/python] [--skip-floor]

For each model (default: tiny Qwen2 and Llama, hidden 256, 4 layers, built here) on the 817
questions of ../shared/data/truthfulqa/mc_task.json:

1. Profile, in this process: tokenization (the data module's items), then plain scoring as
   `svdecode test` runs it, split into the primer cache, packing, the forward passes, the output
   head, the log-softmax and the Python rest (``svdecode_pl.utils.profiling.profiling``).
2. Tokens fed to the model: ours (padding included), lm-eval's (counted in its ``_model_call``,
   padding included) and the limits (one row per answer; question-level shared prefix; primer
   cached once; answers as a trie, which is what the default feeds).
3. Whole runs, alternating, fastest of ``--repeats``: a ``svdecode test`` process, from its start to
   its ``results.json``, against an lm-eval process (``truthfulqa_mc1`` + ``truthfulqa_mc2``,
   batch size 16, benchmarks/lm_eval_reference.py) from start to exit, on the same model and data;
   MC1 must be identical and MC2 within 1e-6.
4. The floor of a whole run on this machine: the start-up of ``import svdecode_pl.cli.lightning`` in a fresh
   process, plus the tokenization, plus the model's linear layers alone on the tokens we feed (each
   timed on 2,048 rows, scaled), plus attention's two matrix products alone on the (query,
   visible key) pairs those tokens need (timed dense, scaled): no exact scoring of those tokens
   can beat it, so lm-eval's time over it bounds the ratio any implementation here could show.

The tiny model's embeddings are drawn with std 0.06 (``--embedding-std``), not the tests' 0.25:
lm-eval's MC2 sums exp(loglikelihood) in float64 without subtracting the maximum, so it is NaN for
a question whose every answer has a loglikelihood below about -745, which the tests' more peaked
random model reaches on half the questions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from svdecode_pl.evaluation.evaluator import score_items
from svdecode_pl.models.loading import load_causal_lm
from svdecode_pl.models.tiny import TINY_MODELS, build_tiny_model
from svdecode_pl.scoring.job import PrefixCache
from svdecode_pl.scoring.packing import continuation_trie
from svdecode_pl.tasks.truthfulqa_mc import TruthfulQADataModule
from svdecode_pl.utils.allocator import keep_freed_memory
from svdecode_pl.utils.profiling import profiling

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "truthfulqa" / "mc_task.json"
TINY = {"qwen2": "svdecode-tiny-256", "llama": "svdecode-tiny-256-llama"}


def profile_ours(model_dir: str, data: Path, limit: int | None, device: str, batch_tokens: int) -> dict:
    """Tokenization + plain scoring of every question as ``svdecode test`` does it (the data
    module's loader, ``score_items``), timed by part; and the token counts of the issue."""
    model = load_causal_lm(model_dir).to(device).eval()
    start = time.perf_counter()
    dm = TruthfulQADataModule(tokenizer=model_dir, path=str(data), train_fraction=0.0, limit=limit)
    dm.setup()
    loader = dm.scoring_dataloader("test")
    tokenization = time.perf_counter() - start
    prefix, records = PrefixCache(), []
    start = time.perf_counter()
    with profiling() as profile, torch.inference_mode():
        for items in loader:
            records += score_items(model, items, None, 256, dm.tokenizer.pad_token_id, prefix,
                                   max_batch_tokens=batch_tokens)
    scoring = time.perf_counter() - start
    items = list(loader.dataset)
    tries = [continuation_trie(item.continuation_ids) for item in items]
    targets = sum(len(trie.targets) for trie in tries)
    floor = linear_floor(model, profile.tokens, targets, device)
    primer = items[0].shared_prefix_len
    # (query, visible key) pairs: a context token sees the primer and the context up to itself, an
    # answer-prefix token the primer, the context and its own ancestors
    pairs = sum(
        sum(range(primer + 1, len(item.context_ids) + 1)) + sum(len(item.context_ids) + d for d in t.depths)
        for item, t in zip(items, tries)
    )
    # lm-eval's requests: every (context, answer) pair of both tasks, fed as (context + answer)[:-1]
    per_answer = sum(
        len(item.context_ids) + len(item.continuation_ids[a]) - 1
        for item in items for a in item.mc1_index + item.mc2_index
    )
    per_question = sum(len(item.context_ids) + sum(map(len, item.continuation_ids)) for item in items)
    # the answers of a question as a trie (shared leading tokens once, no token that predicts nothing)
    trie = sum(len(item.context_ids) - primer + len(t.tokens) for item, t in zip(items, tries))
    return {
        "n": len(records),
        "tokenization": tokenization,
        "scoring": scoring,
        "parts": dict(profile.seconds),
        "tokens": profile.tokens,
        "forward_passes": profile.forward_passes,
        "tokens_per_answer": per_answer,
        "tokens_per_question": per_question,
        "tokens_primer_once": per_question - primer * (len(items) - 1),
        "tokens_trie": trie + primer,
        "linear_floor": floor,
        "attention_pairs": pairs,
        "attention_floor": attention_floor(model, pairs, device),
        "mc1": sum(r.metrics["plain"]["mc1"] for r in records) / len(records),
        "mc2": sum(r.metrics["plain"]["mc2"] for r in records) / len(records),
    }


def fastest_seconds(run, device: str, repeats: int = 6) -> float:
    """Wall time of ``run()``, fastest of ``repeats`` (the first warms up), synchronised on GPUs."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def linear_floor(model: torch.nn.Module, tokens: int, targets: int, device: str, rows: int = 2048) -> float:
    """Seconds the model's matrix products alone take for ``tokens`` fed tokens (and the output
    head for ``targets`` rows) on this machine: each linear layer timed on a ``rows``-token input,
    fastest of 5, scaled. Every fed token must pass through every layer for exact scores, so no
    scoring of these tokens can be faster than this."""
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]

    def seconds(layer: torch.nn.Linear) -> float:
        x = torch.randn(rows, layer.in_features, device=device, dtype=layer.weight.dtype)
        return fastest_seconds(lambda: layer(x), device)

    return sum(map(seconds, layers)) * tokens / rows + seconds(head) * targets / rows


def attention_floor(model: torch.nn.Module, pairs: int, device: str, n: int = 2048) -> float:
    """Seconds the attention's two matrix products alone take for ``pairs`` (query, visible key)
    pairs in every layer: ``q @ k^T`` and ``p @ v`` timed dense on ``n`` queries x ``n`` keys
    (no mask, no softmax, no wasted pairs), fastest of 5, scaled. Exact scores need each visible
    pair once per head and layer."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    q, k, v = (torch.randn(heads, n, head_dim, device=device, dtype=dtype) for _ in range(3))
    best = fastest_seconds(lambda: torch.bmm(torch.bmm(q, k.transpose(1, 2)), v), device)
    return best * config.num_hidden_layers * pairs / (n * n)


def import_seconds(repeats: int = 3) -> float:
    """Wall time of ``import svdecode_pl.cli.lightning`` (Lightning, torch, transformers, PEFT) in a fresh
    process, fastest of ``repeats``: the start-up every ``svdecode fit|validate|test|predict`` pays."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import svdecode_pl.cli.lightning"], check=True, env=env,
                       capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def run_ours(
    model_dir: str, data: Path, limit: int | None, device: str, batch_tokens: int | None, run_dir: Path,
    root: Path = ROOT,
) -> dict:
    """One whole ``svdecode test`` process of the checkout at ``root`` (this one by default): seconds
    from its start to its results.json. Every question is a test question (no warm-start or
    validation split)."""
    quickstart = root / "configs" / "quickstart.yaml"
    command = [
        sys.executable, "-m", "svdecode_pl.cli", "test", "--config", str(quickstart),
        "--config", str(root / "configs" / "peft" / "none.yaml"), "--model.name_or_path", model_dir,
        "--data.path", str(data), "--data.train_fraction", "0", "--trainer.default_root_dir", str(run_dir),
    ]
    if "val_fraction" in quickstart.read_text():  # a checkout from before the validation split has none
        command += ["--data.val_fraction", "0"]
    if limit:
        command += ["--data.limit", str(limit)]
    if device != "cpu":
        command += ["--trainer.accelerator", "gpu"]
    if batch_tokens is not None:
        command += ["--model.score_batch_tokens", str(batch_tokens)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    results = run_dir / "results.json"
    results.unlink(missing_ok=True)
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=run_dir.parent)
    exit_seconds = time.time() - start
    if done.returncode != 0 or not results.exists():
        raise RuntimeError(f"svdecode test failed:\n{done.stderr[-3000:]}")
    payload = json.loads(results.read_text())
    return {"seconds": results.stat().st_mtime - start, "exit_seconds": exit_seconds,
            "mc1": payload["metrics"]["mc1"]["plain"], "mc2": payload["metrics"]["mc2"]["plain"],
            "n": payload["n_examples"]}


def run_lm_eval(python: str, model_dir: str, data: Path, limit: int | None, device: str) -> dict:
    """One whole lm-eval process (truthfulqa_mc1 + truthfulqa_mc2), start to exit."""
    command = [python, str(ROOT / "benchmarks" / "lm_eval_reference.py"), "--model-dir", model_dir,
               "--data", str(data), "--batch-size", "16", "--device", device]
    if limit:
        command += ["--limit", str(limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # PYTHONPATH passed on: carried wheels
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"lm-eval failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": seconds}


def print_profile(name: str, prof: dict, reference: dict | None) -> None:
    parts = prof["parts"]
    rest = prof["scoring"] - sum(parts.values())
    total = prof["tokenization"] + prof["scoring"]
    print(f"\n== {name}: {prof['n']} questions; in-process profile of our scoring ==")
    rows = [("tokenization (data module items)", prof["tokenization"])]
    rows += [(part, parts.get(part, 0.0)) for part in
             ("primer cache", "packing", "forward passes", "output head", "log-softmax")]
    rows += [("Python rest (records, metrics, loops)", rest)]
    for label, seconds in rows:
        print(f"  {label:<40}{seconds:>8.2f} s {100 * seconds / total:>5.1f}%")
    print(f"  {'total':<40}{total:>8.2f} s")
    print(f"tokens fed: ours {prof['tokens']:,} in {prof['forward_passes']} passes"
          + (f"; lm-eval {reference['tokens_fed']:,} in {reference['forward_passes']} passes"
             f" ({reference['tokens_fed'] / prof['tokens']:.1f}x ours)" if reference else ""))
    print(f"limits: one row per answer {prof['tokens_per_answer']:,} (unpadded); question-level shared prefix"
          f" {prof['tokens_per_question']:,} ({prof['tokens_per_answer'] / prof['tokens_per_question']:.1f}x fewer);"
          f" primer cached once {prof['tokens_primer_once']:,}"
          f" ({prof['tokens_per_answer'] / prof['tokens_primer_once']:.1f}x fewer); answers as a trie"
          f" {prof['tokens_trie']:,} ({prof['tokens_per_answer'] / prof['tokens_trie']:.1f}x fewer)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["qwen2", "llama"], choices=sorted(TINY))
    parser.add_argument("--model-dir", help="an HF causal LM dir instead of the tiny models")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument("--embedding-std", type=float, default=0.06, help="std of the tiny models' embeddings")
    parser.add_argument("--score-batch-tokens", type=int, default=None,
                        help="--model.score_batch_tokens of our run (default: the module's default)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating whole runs per side (fastest counts)")
    parser.add_argument("--lm-eval-python", default=os.environ.get("LM_EVAL_PYTHON", "/tmp/lmeval/venv/bin/python"))
    parser.add_argument("--skip-floor", action="store_true",
                        help="leave out the floor of a whole run (3 fresh start-ups timed; the device check's budget)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="another checkout (git worktree add DIR COMMIT): its svdecode test runs alternately"
                             " with ours on the same model; numbers must be identical, times side by side")
    args = parser.parse_args()
    keep_freed_memory()  # as the svdecode command does, so the in-process profile matches its runs
    if not args.data.exists():
        sys.exit(f"{args.data}: not found (the shared data folder is needed for this benchmark)")
    has_lm_eval = Path(args.lm_eval_python).exists()
    if not has_lm_eval:
        print(f"(no lm-eval environment at {args.lm_eval_python}: see benchmarks/lm_eval_reference.py)")
    summary, lm_eval_failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        models = {"model": args.model_dir} if args.model_dir else {}
        for arch in [] if args.model_dir else args.arch:
            torch.manual_seed(0)
            path = Path(tmp) / TINY[arch]
            models[arch] = str(build_tiny_model(path, **TINY_MODELS[TINY[arch]], embedding_std=args.embedding_std))
        for name, model_dir in models.items():
            ours, reference, baseline = None, None, None
            for _ in range(args.repeats):  # alternate: a slow spell of the shared machine hits both sides
                run = run_ours(model_dir, args.data, args.limit, args.device, args.score_batch_tokens,
                               Path(tmp) / f"run-{name}")
                ours = run if ours is None or run["seconds"] < ours["seconds"] else ours
                if args.baseline_tree:
                    run = run_ours(model_dir, args.data, args.limit, args.device, args.score_batch_tokens,
                                   Path(tmp) / f"baseline-{name}", root=args.baseline_tree.resolve())
                    baseline = run if baseline is None or run["seconds"] < baseline["seconds"] else baseline
                if has_lm_eval:
                    try:
                        ref = run_lm_eval(args.lm_eval_python, model_dir, args.data, args.limit, args.device)
                    except RuntimeError as err:  # ours is still reported (e.g. a carried wheel that does not import)
                        print(err, file=sys.stderr)
                        has_lm_eval, lm_eval_failed = False, True
                        continue
                    reference = ref if reference is None or ref["process_seconds"] < reference["process_seconds"] \
                        else reference
            prof = profile_ours(model_dir, args.data, args.limit, args.device, args.score_batch_tokens or 0)
            print_profile(name, prof, reference)
            print(f"whole runs (fastest of {args.repeats}): svdecode test {ours['seconds']:.1f} s to results.json"
                  f" ({ours['exit_seconds']:.1f} s to exit)", end="")
            if baseline:
                same = all(ours[k] == baseline[k] for k in ("mc1", "mc2", "n"))
                print(f"; baseline {args.baseline_tree} {baseline['seconds']:.1f} s"
                      f" (ours/baseline {ours['seconds'] / baseline['seconds']:.3f}), numbers identical: {same}"
                      f" (baseline MC1 {baseline['mc1']:.10f} MC2 {baseline['mc2']:.10f}, {baseline['n']} questions)",
                      end="")
            if reference:
                ratio = reference["process_seconds"] / ours["seconds"]
                mc1_same = ours["mc1"] == reference["mc1"]
                mc2_diff = abs(ours["mc2"] - reference["mc2"])
                print(f"; lm-eval {reference['process_seconds']:.1f} s (of which simple_evaluate"
                      f" {reference['seconds']:.1f} s)")
                print(f"MC1 ours {ours['mc1']:.10f} lm-eval {reference['mc1']:.10f} identical: {mc1_same}; "
                      f"MC2 ours {ours['mc2']:.10f} lm-eval {reference['mc2']:.10f} |diff| {mc2_diff:.1e}")
                print(f"speed-up over lm-eval, whole runs: {ratio:.2f}x"
                      f" (token-count limit {reference['tokens_fed'] / prof['tokens']:.1f}x)")
                summary.append((name, ratio, mc1_same, mc2_diff))
            else:
                print()
            if args.skip_floor:
                continue
            start_up = import_seconds()
            floor = start_up + prof["tokenization"] + prof["linear_floor"] + prof["attention_floor"]
            print("floor of a whole run here: start-up (import svdecode_pl.cli.lightning, fastest of 3)"
                  f" {start_up:.1f} s"
                  f" + tokenization {prof['tokenization']:.1f} s + the linear layers alone on our tokens"
                  f" {prof['linear_floor']:.1f} s + attention's products alone on the visible pairs"
                  f" ({prof['attention_pairs']:,}) {prof['attention_floor']:.1f} s = {floor:.1f} s", end="")
            print(f"; so at most {reference['process_seconds'] / floor:.2f}x lm-eval's run" if reference else "")
    if summary:
        print("\nsummary: " + "; ".join(f"{name} {ratio:.2f}x (MC1 identical {same}, MC2 diff {diff:.1e})"
                                        for name, ratio, same, diff in summary))
    if lm_eval_failed:
        sys.exit("lm-eval failed (its error is above): ours only")


if __name__ == "__main__":
    main()
