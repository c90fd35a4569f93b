"""TruthfulQA MC scoring speed and parity: svdecode-pl vs lm-evaluation-harness, in one run.

    python benchmarks/truthfulqa_mc.py [--model-dir DIR | --arch qwen2|llama] [--limit N]
        [--repeats 2] [--lm-eval-python /tmp/lmeval/venv/bin/python]

Builds (or takes) a tiny model (hidden 256, 4 layers), scores the 817 questions of
../shared/data/truthfulqa/mc_task.json with svdecode-pl: plain, with a static steering vector
and with a dynamic one, and, if an lm-eval environment is given (see
benchmarks/lm_eval_reference.py for its two-line set-up), runs lm-eval's truthfulqa_mc1/mc2
on the same model and data. Prints MC1/MC2 side by side and the time ratios.
Timings cover data preparation (tokenization) and scoring, not model loading, for both; ours
are the fastest of ``--repeats`` rounds (plain, static, dynamic alternate within a round, so
that a slow spell of a shared machine does not fall on one variant only).

The tiny model's embeddings are drawn with std 0.06 (``--embedding-std``), not the tests' 0.25:
lm-eval's MC2 sums exp(loglikelihood) in float64 without subtracting the maximum, so it is NaN
for a question whose every answer has a loglikelihood below about -745, which the tests' more
peaked random model reaches on half the questions. The script counts such questions.
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

from svdecode_pl.data.truthfulqa import TruthfulQADataModule
from svdecode_pl.modeling import load_causal_lm
from svdecode_pl.scoring import PrefixCache
from svdecode_pl.steering import SteeringVector
from svdecode_pl.tasks import score_items
from svdecode_pl.tiny import TINY_MODELS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "truthfulqa" / "mc_task.json"


def ours(model: torch.nn.Module, model_dir: str, data: Path, limit: int | None, vector: SteeringVector | None,
         batch: int | None, batch_tokens: int = 0) -> dict:
    """Data preparation + scoring of every question, as `svdecode test` does it (its loader, its
    batch size unless ``batch`` is given)."""
    start = time.perf_counter()
    extra = {} if batch is None else {"eval_batch_size": batch}
    dm = TruthfulQADataModule(tokenizer=model_dir, path=str(data), train_fraction=0.0, limit=limit, **extra)
    dm.setup()
    prefix, records = PrefixCache(), []
    with torch.inference_mode():
        for items in dm.scoring_dataloader("test"):
            records += score_items(model, items, vector, 256, dm.tokenizer.pad_token_id, prefix,
                                   max_batch_tokens=batch_tokens)
    seconds = time.perf_counter() - start
    variant = "plain" if vector is None else "steered"
    mean = lambda name: sum(r["metrics"][variant][name] for r in records) / len(records)  # noqa: E731
    # questions whose every MC2 answer has exp(ll) == 0 in float64: lm-eval's MC2 is NaN there
    mc2_index = {item["uid"]: item["mc2_index"] for item in dm.scoring_dataloader("test").dataset}
    underflow = sum(
        max(r["scores"][variant][i] for i in mc2_index[r["uid"]]) < -745.0 for r in records
    )
    return {"mc1": mean("mc1"), "mc2": mean("mc2"), "mc3": mean("mc3"), "seconds": seconds, "n": len(records),
            "underflow": underflow}


def lm_eval(python: str, model_dir: str, data: Path, limit: int | None) -> dict | None:
    script = ROOT / "benchmarks" / "lm_eval_reference.py"
    command = [python, str(script), "--model-dir", model_dir, "--data", str(data), "--batch-size", "16"]
    if limit:
        command += ["--limit", str(limit)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="an HF causal LM dir (default: build the tiny 256/4 model)")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="questions per batch (default: the data module's)")
    parser.add_argument("--embedding-std", type=float, default=0.06, help="std of the tiny model's embeddings")
    parser.add_argument("--score-batch-tokens", type=int, default=0,
                        help="padded tokens per forward (0, the default: one question per forward)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of our three variants (fastest counts)")
    parser.add_argument("--lm-eval-python", default=os.environ.get("LM_EVAL_PYTHON", "/tmp/lmeval/venv/bin/python"))
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: not found (the shared data folder is needed for this benchmark)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            name = "svdecode-tiny-256" if args.arch == "qwen2" else "svdecode-tiny-256-llama"
            spec = TINY_MODELS[name]
            model_dir = str(build_tiny_model(Path(tmp) / name, **spec, embedding_std=args.embedding_std))
        model = load_causal_lm(model_dir).eval()
        vocab = model.config.vocab_size
        vectors = {
            "plain": None,
            "static": SteeringVector(torch.randn(vocab) * 0.1, -0.5),
            "dynamic": SteeringVector(None, -0.5, mode="dynamic", metadata={"vocab_size": vocab}),
        }
        runs: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant, vector in vectors.items():
                run = ours(model, model_dir, args.data, args.limit, vector, args.batch, args.score_batch_tokens)
                if variant not in runs or run["seconds"] < runs[variant]["seconds"]:
                    runs[variant] = run
        reference = None
        if Path(args.lm_eval_python).exists():
            reference = lm_eval(args.lm_eval_python, model_dir, args.data, args.limit)
        else:
            print(f"(no lm-eval environment at {args.lm_eval_python}: see benchmarks/lm_eval_reference.py)")
    plain = runs["plain"]
    model_name = args.model_dir or f"{args.arch} hidden 256, 4 layers, embedding std {args.embedding_std}"
    print(f"\nTruthfulQA MC, {plain['n']} questions, model {model_name}")
    print(f"questions where lm-eval's MC2 underflows to NaN: {plain['underflow']}")
    print(f"{'':<22}{'MC1':>14}{'MC2':>14}{'seconds':>10}")
    for name, run in runs.items():
        print(f"{'svdecode-pl ' + name:<22}{run['mc1']:>14.10f}{run['mc2']:>14.10f}{run['seconds']:>10.1f}")
    if reference:
        ref = reference
        print(f"{'lm-eval (bs 16)':<22}{ref['mc1']:>14.10f}{ref['mc2']:>14.10f}{ref['seconds']:>10.1f}")
        print(f"|MC1 diff| {abs(ref['mc1'] - plain['mc1']):.2e}   |MC2 diff| {abs(ref['mc2'] - plain['mc2']):.2e}")
        print(f"speed-up over lm-eval: {reference['seconds'] / plain['seconds']:.2f}x")
    print(f"static steered / plain: {runs['static']['seconds'] / plain['seconds']:.2f}x   "
          f"dynamic steered / plain: {runs['dynamic']['seconds'] / plain['seconds']:.2f}x")


if __name__ == "__main__":
    main()
