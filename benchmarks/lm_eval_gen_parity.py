#!/usr/bin/env python
"""The project's truthfulqa_gen prompt, references and BLEU/ROUGE against lm-eval's, question by question.

Reads the JSONL of ``benchmarks/lm_eval_gen_reference.py`` (run in lm-eval's venv) and, in the
project's venv, recomputes everything lm-eval computed:

    PYTHONPATH=. .venv/bin/python benchmarks/lm_eval_gen_parity.py --reference gen_reference.jsonl \\
        [--data TruthfulQA.csv] [--model-dir DIR] [--completions ours.jsonl]

Checks, printed as one JSON line:
  * prompt_mismatches: questions whose ``truthfulqa_gen_prompt`` differs from lm-eval's context;
  * reference_mismatches: questions whose ``truthfulqa_gen_references`` (from the hub-form
    record, and with ``--data`` from the CSV cells directly) differ from lm-eval's processed answers;
  * max_abs_diff: per metric, the largest |ours - lm-eval| over lm-eval's completions and the
    hand-made ``extra`` completions; summary_max_abs_diff: the same for the means, from
    :class:`TruthfulQAGenMetrics`;
  * with ``--model-dir``: greedy ``generate`` on our prompt at batch size 1 (until "\\n\\n" or EOS, at
    most 256 new tokens, text cut at the stop strings), generations_equal = questions whose text
    equals lm-eval's completion;
  * with ``--completions``: a JSONL of {"doc_id", "completion"} from any generator (e.g. the
    project's), compared the same way;
  * with ``--predictions``: the ``predictions.jsonl`` of ``svdecode predict`` (its plain
    generations, matched to lm-eval's questions by text): predictions_equal = questions whose
    generation equals lm-eval's completion, and predictions_metric_max_abs_diff = the largest
    |our record's metric - lm-eval's| over those questions (the whole pipeline, end to end).

For a model that writes real answers and stop strings (not a random one), build
``benchmarks/tiny_qa_model.py``'s.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

from svdecode_pl.corpus.primer import truthfulqa_gen_prompt
from svdecode_pl.metrics.per_question import TruthfulQAGenMetrics
from svdecode_pl.metrics.text import TRUTHFULQA_GEN_KEYS, truthfulqa_gen_references, truthfulqa_gen_scores


def read_reference(path: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [line for line in lines if "doc_id" in line], next(line for line in lines if "summary" in line)


def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int = 256, stop: str = "\n\n") -> str:
    """lm-eval's decoding of one prompt: greedy, until the stop string or EOS, text cut at both."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    encoded = tokenizer(prompt, return_tensors="pt")
    n_prompt = encoded["input_ids"].shape[1]

    class StopString(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = stop in tokenizer.decode(input_ids[0, n_prompt:])
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([StopString()]),
                             pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    for term in (stop, tokenizer.eos_token):
        if term:
            text = text.split(term)[0]
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="JSONL written by lm_eval_gen_reference.py")
    ap.add_argument("--data", default=None, help="TruthfulQA.csv, to check references from the raw cells too")
    ap.add_argument("--model-dir", default=None, help="generate greedily with our prompt and compare texts")
    ap.add_argument("--completions", default=None, help="JSONL of {doc_id, completion} to compare")
    ap.add_argument("--predictions", default=None, help="predictions.jsonl of `svdecode predict` to compare")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (on a busy CPU: 1)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    questions, summary = read_reference(args.reference)
    csv_rows = None
    if args.data:
        with open(args.data, newline="", encoding="utf-8-sig") as handle:
            csv_rows = [r for r in csv.DictReader(handle) if r["Correct Answers"] and r["Incorrect Answers"]]
    report: dict = {"n": len(questions), "prompt_mismatches": [], "reference_mismatches": []}
    worst = dict.fromkeys(TRUTHFULQA_GEN_KEYS, 0.0)
    n_scored = 0
    metric = TruthfulQAGenMetrics()
    start = time.perf_counter()
    for q in questions:
        record = q["source_record"]
        if truthfulqa_gen_prompt(record["question"]) != q["context"]:
            report["prompt_mismatches"].append(q["doc_id"])
        refs = truthfulqa_gen_references(record["correct_answers"], record["incorrect_answers"])
        lm_eval_refs = (q["correct_answers"], q["incorrect_answers"])
        from_csv = refs
        if csv_rows is not None:
            row = csv_rows[q["doc_id"]]
            from_csv = truthfulqa_gen_references(row["Correct Answers"], row["Incorrect Answers"])
        if refs != lm_eval_refs or from_csv != lm_eval_refs:
            report["reference_mismatches"].append(q["doc_id"])
        cases = [(q["completion"], q["metrics"])] + [(e["completion"], e["metrics"]) for e in q.get("extra", [])]
        for completion, theirs in cases:
            ours = truthfulqa_gen_scores(completion, *refs)
            n_scored += 1
            for key in TRUTHFULQA_GEN_KEYS:
                worst[key] = max(worst[key], abs(ours[key] - theirs[key]))
        metric.update([q["doc_id"]], [q["completion"]], [refs[0]], [refs[1]])
    report["metric_seconds"] = round(time.perf_counter() - start, 3)
    means = metric.compute()
    report["completions_scored"] = n_scored
    report["max_abs_diff"] = worst
    report["max_abs_diff_all"] = max(worst.values())
    report["summary_max_abs_diff"] = max(abs(float(means[k]) - summary["summary"][k]) for k in TRUTHFULQA_GEN_KEYS)
    report["lm_eval_summary"] = summary["summary"]

    if args.completions:
        ours = {r["doc_id"]: r["completion"] for r in map(json.loads, open(args.completions, encoding="utf-8"))}
        shared = [q for q in questions if q["doc_id"] in ours]
        report["completions_compared"] = len(shared)
        report["completions_equal"] = sum(ours[q["doc_id"]] == q["completion"] for q in shared)
    if args.predictions:
        records = [json.loads(line) for line in open(args.predictions, encoding="utf-8") if line.strip()]
        by_question = {r["question"]: r for r in records}
        shared = [(q, by_question[q["source_record"]["question"]]) for q in questions
                  if q["source_record"]["question"] in by_question]
        equal = [(q, r) for q, r in shared if r["generation"]["plain"] == q["completion"]]
        report["predictions_compared"] = len(shared)
        report["predictions_equal"] = len(equal)
        report["predictions_differ"] = [q["doc_id"] for q, r in shared if r["generation"]["plain"] != q["completion"]]
        report["predictions_metric_max_abs_diff"] = max(
            (abs(r["metrics"]["plain"][k] - q["metrics"][k]) for q, r in equal for k in TRUTHFULQA_GEN_KEYS),
            default=None,
        )
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32").eval()
        max_new_tokens = int(questions[0]["gen_kwargs"].get("max_gen_toks", 256))
        start = time.perf_counter()
        texts = [greedy_completion(model, tokenizer, truthfulqa_gen_prompt(q["source_record"]["question"]),
                                   max_new_tokens) for q in questions]
        report["generate_seconds"] = round(time.perf_counter() - start, 3)
        report["generations_equal"] = sum(t == q["completion"] for t, q in zip(texts, questions))
    print(json.dumps(report), flush=True)
    ok = not report["prompt_mismatches"] and not report["reference_mismatches"] and report["max_abs_diff_all"] < 1e-6
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
