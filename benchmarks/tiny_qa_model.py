#!/usr/bin/env python
"""A tiny model that writes TruthfulQA-style answers, for generation parity checks with lm-eval.

    PYTHONPATH=. .venv/bin/python benchmarks/tiny_qa_model.py --out /tmp/tiny_qa [--steps 400]

A random tiny model writes no answer and no stop string (it repeats one token for 256 steps), so
a parity check on it never exercises the cut at ``"\\n\\n"``. This one is the tiny Qwen2 of the
benchmarks (hidden 256, 4 layers, the project's 710-token BPE tokenizer), every weight trained
from scratch on a stream of ``"Q: {question}\\nA: {answer}\\n\\n"`` pairs from TruthfulQA.csv (best
and other correct answers) and the QA primer. Given lm-eval's ``truthfulqa_gen`` prompt (the primer,
then ``"\\n\\nQ: {question}"``), it writes ``"\\nA: ..."`` and then ``"\\n\\n"``, so both sides' stop
rule and cut run on real text. The result is a plain HF model directory (model + tokenizer) that
both lm-eval (``benchmarks/lm_eval_gen_reference.py --model-dir``) and ``svdecode`` load.
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

import torch

from svdecode_pl.corpus.primer import QA_PRIMER
from svdecode_pl.models.tiny import TINY_MODELS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"


def qa_pairs(path: Path) -> list[tuple[str, str]]:
    """(``"Q: {question}"``, ``"\\nA: {answer}\\n\\n"``) for every correct answer of every question,
    and the primer's pairs."""
    pairs = []
    for block in QA_PRIMER.split("\n\n"):
        if block.strip():
            question, answer = block.strip().split("\nA: ")
            pairs.append((question, f"\nA: {answer}\n\n"))
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            answers = [row["Best Answer"], *row["Correct Answers"].split(";")]
            for answer in dict.fromkeys(a.strip() for a in answers if a.strip()):
                pairs.append((f"Q: {row['Question'].strip()}", f"\nA: {answer}\n\n"))
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(args.out).exists():
        ap.error(f"--out {args.out}: already exists")
    out = build_tiny_model(args.out, **TINY_MODELS["svdecode-tiny-256"], seed=args.seed, embedding_std=0.06)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    rng = random.Random(args.seed)
    pairs = qa_pairs(args.data)
    # question and answer encoded apart, as in generation: the prompt ends with the question's "?",
    # which the whole pair's encoding would merge with the "\n" after it
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    encoded = [encode(question) + encode(answer) for question, answer in pairs]
    stream: list[int] = []
    while len(stream) < args.steps * args.batch_size * args.seq_len:
        rng.shuffle(encoded)
        stream += [token for ids in encoded for token in ids]
    data = torch.tensor(stream[: args.steps * args.batch_size * args.seq_len]).view(
        args.steps, args.batch_size, args.seq_len
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.steps)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(data):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out)
    print(f"{len(pairs)} QA pairs; model written to {out}")


if __name__ == "__main__":
    main()
