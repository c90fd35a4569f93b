"""The one device check (issue 21, item 4): GPU-marked tests, then the benchmarks on a
Qwen2.5-1.5B-shaped random bfloat16 model, with one summary file. Runs with no network.

On the GPU machine (from the repository root; wheels carried in .whl/, see below)::

    python3 benchmarks/device_check.py --out $OUT/device_check.json

Where no GPU is lent, ``--dry-run`` runs every step on the CPU with tiny shapes (a 2-layer model,
``SVDECODE_TEST_DEVICE=cpu`` for the tests) to check the script's own steps.

Wheels: the machine has torch, transformers, Lightning, PEFT and torchmetrics, not DeepSpeed,
jsonargparse (the CLI), datasets or rouge-score. Collect them here, once, with the commands of
``benchmarks/README.md`` ("Device check") into ``.whl/`` (git-ignored; carried with the run); this
script installs the missing ones with ``pip install --no-index --target`` before anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"deepspeed": "deepspeed", "jsonargparse": "jsonargparse", "datasets": "datasets",
          "rouge_score": "rouge-score"}
#: Qwen2.5-1.5B's configuration (random weights); the dry run keeps its vocabulary (the extraction
#: benchmark draws ids below it).
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768)
DRY = dict(QWEN_1_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


def install_wheels(env: dict[str, str], dry_run: bool) -> dict:
    """Install the missing packages from .whl/ into a target directory on PYTHONPATH."""
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    step = {"missing": missing, "wheels": len(wheels)}
    if missing and wheels:
        target = Path(env.get("TMPDIR", "/tmp")) / "svdecode-site"
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(target), *wheels]
        step["rc"] = subprocess.run(command, capture_output=True, text=True).returncode
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    elif missing and not dry_run:
        step["note"] = "missing packages and no .whl/: their tests are skipped"
    return step


def build_model(path: Path, shape: dict, device: str) -> Path:
    """A random bfloat16 model of ``shape`` with the project's tiny tokenizer (vocabulary padded)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from svdecode_pl.models.tiny import build_tokenizer, save_model_dir

    tokenizer = build_tokenizer()
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.get_input_embeddings().weight.data.normal_(0.0, 0.25)  # logits with range, as the tiny models
    return save_model_dir(model.cpu(), tokenizer, path)


def run_step(name: str, command: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run one step; its wall time, exit status and the tail of its output. A step that runs out of
    time is killed with its whole process group: a test's own child (a DeepSpeed run) left behind
    would hold the rendezvous port and hang the next step."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout)
        rc = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        rc, output = 124, f"timed out after {timeout:.0f}s\n{output or ''}"
    seconds = round(time.perf_counter() - start, 1)
    print(f"[{name}] rc {rc}, {seconds} s", flush=True)
    return {"rc": rc, "seconds": seconds, "output_tail": str(output)[-4000:]}


def steps(model_dir: Path, device: str, dry_run: bool) -> dict[str, list[str]]:
    """The commands, by name: tests, then benchmarks (smaller in the dry run)."""
    py = sys.executable
    prompts, tokens, limit = ("4", "8", "8") if dry_run else ("16", "64", "128")
    generation = [py, "benchmarks/generation.py", "--model", str(model_dir), "--device", device,
                  "--dtype", "bfloat16", "--prompts", prompts, "--new-tokens", tokens, "--repeat", "1"]
    return {
        "gpu_tests": [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
        "generation_batch_1": [*generation, "--batch", "1"],
        "generation_batch_16": [*generation, "--batch", "16"],
        "truthfulqa_mc": [py, "benchmarks/truthfulqa_mc.py", "--model-dir", str(model_dir), "--device", device,
                          "--limit", limit, "--repeats", "1"],
        # extraction against one forward pass of the adapted and the base model, on the device
        "extraction": [py, "benchmarks/steering_extraction.py", "--model-dir", str(model_dir), "--device", device,
                       "--sizes", "4", "--naive-sizes", "--time-size", "4", "--seq-len", "64" if dry_run else "512",
                       "--repeat", "1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "device_check.json")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "device_check")
    parser.add_argument("--step-timeout", type=float, default=240.0, help="seconds per step")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if args.dry_run else "cuda"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        env["SVDECODE_TEST_DEVICE"] = "cpu"
    summary: dict = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "steps": {}}
    summary["steps"]["wheels"] = install_wheels(env, args.dry_run)
    start = time.perf_counter()
    model_dir = build_model(args.workdir / "qwen2.5-1.5b-shape", DRY if args.dry_run else QWEN_1_5B, device)
    summary["steps"]["build_model"] = {"seconds": round(time.perf_counter() - start, 1), "path": str(model_dir)}
    for name, command in steps(model_dir, device, args.dry_run).items():
        summary["steps"][name] = run_step(name, command, env, args.step_timeout)
    failed = [name for name, step in summary["steps"].items() if step.get("rc", 0) != 0]
    summary["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"summary written to {args.out}; failed steps: {failed or 'none'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
