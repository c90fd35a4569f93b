#!/usr/bin/env python
"""lm-evaluation-harness's own completions (``HFLM.generate_until``) for given contexts, offline.

Run with lm-eval's venv, not the project's (see ``benchmarks/lm_eval_reference.py`` for how it
is made); ``benchmarks/generation.py --lm-eval-python`` calls it and compares the completions
with :func:`svdecode_pl.decoding.generation.generate_texts`:

    /tmp/lmeval/venv/bin/python benchmarks/lm_eval_generate_reference.py --model-dir DIR \
        --contexts contexts.json [--until "\\n\\n"] [--max-gen-toks 64] [--batch-size 1]

``contexts.json`` is a JSON list of strings. Prints one JSON list of completions on stdout,
in the order of the contexts (greedy: ``do_sample=False``, as truthfulqa_gen asks).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--contexts", required=True)
    parser.add_argument("--until", action="append", default=None)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    with open(args.contexts) as f:
        contexts = json.load(f)
    lm = HFLM(pretrained=args.model_dir, batch_size=args.batch_size, device="cpu", dtype="float32")
    kwargs = {"until": args.until or ["\n\n"], "do_sample": False, "max_gen_toks": args.max_gen_toks}
    requests = [
        Instance(request_type="generate_until", doc={}, arguments=(context, dict(kwargs)), idx=0,
                 metadata=("generation", index, 1))
        for index, context in enumerate(contexts)
    ]
    print(json.dumps(lm.generate_until(requests, disable_tqdm=True)))


if __name__ == "__main__":
    main()
