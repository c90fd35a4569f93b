#!/usr/bin/env python
"""Steered TruthfulQA MC1/MC2 checked independently (issue 19, item 4): lm-eval's own
``truthfulqa_mc1``/``truthfulqa_mc2`` task files, run through the lm-eval backend
(:class:`svdecode_pl.integrations.lm_eval_backend.SteeredHFLM`), against whole ``svdecode test`` runs,
plain, static and dynamic. MC1 must be identical, MC2 within 1e-6.

Needs lm-eval in the project's environment (``pip install -e '.[lm-eval]'``):

    python benchmarks/lm_eval_steered_parity.py [--arch qwen2 llama | --model-dir DIR] [--limit N]
        [--hidden-size 256] [--layers 4] [--batch-size 16] [--device cpu]

Without --model-dir it builds, per ``--arch``, the benchmarks' random-init tiny Qwen2 or Llama
(256x4, embeddings std 0.06, seed 0; see README): a model nobody in the project trained. The
adapter is a LoRA with random non-zero weights (randomised, not trained; seed 1) and the vectors
are a random static direction (mu -4) and a dynamic one (mu -1.5): the parity is about the
arithmetic, not the quality. Prints one line per variant with both sides' numbers and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from svdecode_pl.steering.vector import SteeringVector  # noqa: E402

SVDECODE = Path(os.environ.get("SVDECODE_BIN", Path(sys.executable).with_name("svdecode")))


def build_inputs(work: Path, model_dir: str | None, arch: str = "qwen2", hidden: int = 256,
                 layers: int = 4) -> tuple[str, Path, dict[str, Path]]:
    """The model, a LoRA adapter with non-zero weights, a static and a dynamic vector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from svdecode_pl.models.tiny import build_tiny_model

    if model_dir is None:
        model_dir = str(work / "model")
        build_tiny_model(Path(model_dir), architecture=arch, hidden_size=hidden, num_layers=layers, num_heads=4,
                         num_kv_heads=2, embedding_std=0.06)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(str(work / "adapter"))
    vocab = base.config.get_text_config().vocab_size
    direction = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.5
    vectors = {"static": SteeringVector(direction, mu=-4.0).save(work / "static"),
               "dynamic": SteeringVector(None, mu=-1.5, mode="dynamic", metadata={"vocab_size": vocab})
               .save(work / "dynamic")}
    return model_dir, work / "adapter", vectors


def run_ours(model_dir: str, adapter: Path, vector: Path | None, data: Path, limit: int | None,
             run_dir: Path) -> dict:
    """A whole ``svdecode test`` process with the adapter (and the vector as ``<run>/steering``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if vector is not None:
        shutil.copytree(vector, run_dir / "steering", dirs_exist_ok=True)
    command = [str(SVDECODE), "test", "--config", str(ROOT / "configs" / "quickstart.yaml"),
               "--model.name_or_path", model_dir, "--model.adapter_path", str(adapter), "--data.path", str(data),
               "--data.train_fraction", "0", "--trainer.default_root_dir", str(run_dir)]
    command += ["--data.limit", str(limit)] if limit else []
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir.parent)
    if done.returncode != 0:
        raise RuntimeError(f"svdecode test failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    side = "plain" if vector is None else "steered"
    return {"mc1": metrics["mc1"][side], "mc2": metrics["mc2"][side], "seconds": time.time() - start}


def run_lm_eval(model_dir: str, adapter: Path, vector: Path | None, task_dir: Path, limit: int | None,
                device: str, batch_size: int = 16) -> dict:
    """lm-eval's truthfulqa_mc1/mc2 through the steered backend, in this process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from svdecode_pl.integrations.lm_eval_backend import SteeredHFLM

    start = time.time()
    lm = SteeredHFLM(pretrained=model_dir, peft=str(adapter), steering=str(vector) if vector else None,
                     dtype="float32", device=device, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=["truthfulqa_mc1", "truthfulqa_mc2"], limit=limit,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    res = out["results"]
    return {"mc1": res["truthfulqa_mc1"]["acc,none"], "mc2": res["truthfulqa_mc2"]["acc,none"],
            "seconds": time.time() - start}


def main() -> int:
    from lm_eval_reference import load_records, write_task_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["qwen2"], choices=["qwen2", "llama"])
    ap.add_argument("--model-dir", default=None, help="an existing model instead of --arch's tiny ones")
    ap.add_argument("--hidden-size", type=int, default=256, help="of --arch's tiny model")
    ap.add_argument("--layers", type=int, default=4, help="of --arch's tiny model")
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "truthfulqa" / "mc_task.json")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="steered_parity_"))
    ok = True
    for arch in [None] if args.model_dir else args.arch:
        work = root / (arch or "model")
        work.mkdir()
        model_dir, adapter, vectors = build_inputs(work, args.model_dir, arch or "qwen2", args.hidden_size, args.layers)
        jsonl = work / "truthfulqa_mc.jsonl"
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in load_records(str(args.data))))
        (work / "tasks").mkdir()
        write_task_dir(jsonl, work / "tasks")
        for name, vector in (("plain", None), ("static", vectors["static"]), ("dynamic", vectors["dynamic"])):
            ours = run_ours(model_dir, adapter, vector, args.data, args.limit, work / f"run_{name}")
            theirs = run_lm_eval(model_dir, adapter, vector, work / "tasks", args.limit, args.device,
                                 args.batch_size)
            same = ours["mc1"] == theirs["mc1"] and abs(ours["mc2"] - theirs["mc2"]) <= 1e-6
            ok &= same
            print(f"{arch or model_dir} {name:8s} MC1 ours {ours['mc1']:.10f} lm-eval {theirs['mc1']:.10f} | "
                  f"MC2 ours {ours['mc2']:.10f} lm-eval {theirs['mc2']:.10f} "
                  f"(|d| {abs(ours['mc2'] - theirs['mc2']):.1e}) | svdecode test {ours['seconds']:.1f} s, "
                  f"lm-eval {theirs['seconds']:.1f} s | {'OK' if same else 'DIFFERENT'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
