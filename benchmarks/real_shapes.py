"""Real shapes on the CPU (issue 21, item 2): time and peak memory of each phase on random-weight
models with the exact configurations of Qwen2.5-0.5B and Llama-3.2-1B (2 layers), and whether
memory grows with the number of questions beyond the batch.

    python benchmarks/real_shapes.py [--shapes qwen2.5-0.5b llama-3.2-1b-untied] [--questions 8 32]

Each phase is one ``svdecode`` command in a fresh process (the library's CLI, as a user runs it);
its peak memory is that process's own RSS high-water mark (VmHWM), its time the
command's wall time, start-up and model loading included (the ``load`` phase gives that floor).
Phases: ``fit`` (a few warm-start steps + static extraction), ``extract`` (dynamic extraction only,
``max_steps 0``), then at each question count: ``test_mc`` (TruthfulQA MC, static),
``gen_static`` / ``gen_dynamic`` (TruthfulQA generation) and ``predict`` (MC, static), each at
mu* alone (``--steering.mu_grid null``: the quickstart's 15-strength curve would decode 15 times).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svdecode_pl.models.real_shapes import build_real_shape_model  # noqa: E402

#: Benchmark name -> (REAL_SHAPES key, overrides). Llama-3.2-1B ties its embeddings; the untied
#: variant has Llama-3.1-8B's separate head (the case the issue asks for) on the 1B's shapes.
SHAPES = {
    "qwen2.5-0.5b": ("qwen2.5-0.5b", {}),
    "llama-3.2-1b": ("llama-3.2-1b", {}),
    "llama-3.2-1b-untied": ("llama-3.2-1b", {"tie_word_embeddings": False}),
    # the test-sized model: tiny hidden size, Qwen2.5's 151,936 logits and tokenizer
    "qwen2.5-vocab-hidden64": ("qwen2.5-0.5b", dict(hidden_size=64, intermediate_size=256,
                                                    num_attention_heads=4, num_key_value_heads=2)),
}
GROWING_PHASES = ("test_mc", "gen_static", "gen_dynamic", "predict")


#: Runs ``-m MODULE ARGS`` or ``-c CODE`` and writes its own RSS high-water mark (VmHWM, KiB) to
#: argv[1] at exit. Read in the child because ``ru_maxrss`` of a vfork-spawned child starts at the
#: parent's peak (exec records the shared address space's high-water mark).
PEAK_WRAPPER = """
import atexit, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
def report():
    status = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]
    open(out, 'w').write(status)
atexit.register(report)
if args[0] == '-m':
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name='__main__', alter_sys=True)
else:
    sys.argv = ['-c', *args[2:]]
    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})
"""


def run_measured(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict:
    """Run ``python ARGS`` (``args[0]`` the interpreter) in a child process: wall seconds and the
    child's own peak RSS in MB (its VmHWM, see :data:`PEAK_WRAPPER`)."""
    peak_file = Path(log or "run").with_suffix(".peak")
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        child = subprocess.run([args[0], "-c", PEAK_WRAPPER, str(peak_file), *args[1:]], env=env, stdout=out,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        if log:
            out.close()
    if child.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(args[:4])}... failed ({child.returncode}):\n{tail}")
    peak_kib = int(peak_file.read_text())
    return {"seconds": round(time.perf_counter() - start, 2), "peak_mb": round(peak_kib / 1024, 1)}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "svdecode_pl.cli", *args]


def common(model: Path, root: Path, dtype: str, questions: int) -> list[str]:
    precision = "bf16-true" if dtype == "bfloat16" else "32-true"
    return ["--model.name_or_path", str(model), "--model.dtype", dtype, "--trainer.precision", precision,
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--data.synthetic_questions", str(2 * questions),
            "--data.train_fraction", "0.5", "--data.val_fraction", "0", "--data.batch_size", "2",
            "--steering.strength", "mu_star"]  # no validation split: steer at the paper's mu*, not off


def phase_commands(model: Path, work: Path, dtype: str, questions: int, eval_batch: int, new_tokens: int) -> dict:
    """The growing phases' commands at ``questions`` test questions (half of the generated set)."""
    mc = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    gen = ["--config", str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"),
           "--data.generation.max_new_tokens", str(new_tokens)]
    adapter = ["--model.adapter_path", str(work / "fit" / "adapter"), "--data.eval_batch_size", str(eval_batch)]

    def args(base: list[str], mode: str, name: str) -> list[str]:
        return [*base, *common(model, work / f"{name}_{questions}", dtype, questions), *adapter,
                "--steering.mode", mode, "--steering.dirpath", str(work / mode), "--steering.mu_grid", "null"]

    writer = "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"
    return {
        "test_mc": cli("test", *args(mc, "static", "test_mc")),
        "gen_static": cli("test", *args(gen, "static", "gen_static")),
        "gen_dynamic": cli("test", *args(gen, "dynamic", "gen_dynamic")),
        "predict": cli("predict", *args(mc, "static", "predict"), writer),
    }


def measure(model: Path, work: Path, dtype: str = "float32", questions: tuple[int, ...] = (8, 32),
            eval_batch: int = 4, new_tokens: int = 8, fit_steps: int = 2,
            phases: tuple[str, ...] = GROWING_PHASES, verbose: bool = True) -> dict:
    """Every phase's {seconds, peak_mb}; growing phases keyed ``"<phase>@<questions>"``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    work.mkdir(parents=True, exist_ok=True)
    mc = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    load = (f"from svdecode_pl.models.loading import load_causal_lm, load_tokenizer; "
            f"load_causal_lm({str(model)!r}, {dtype!r}); load_tokenizer({str(model)!r})")
    steps = {
        "load": [sys.executable, "-c", load],
        "fit": cli("fit", *mc, *common(model, work / "fit", dtype, 8), "--trainer.max_steps", str(fit_steps),
                   "--steering.dirpath", str(work / "static")),
        "extract": cli("fit", *mc, *common(model, work / "extract", dtype, 8), "--trainer.max_steps", "0",
                       "--model.adapter_path", str(work / "fit" / "adapter"), "--steering.mode", "dynamic",
                       "--steering.dirpath", str(work / "dynamic")),
    }
    for count in questions:
        for name, command in phase_commands(model, work, dtype, count, eval_batch, new_tokens).items():
            if name in phases:
                steps[f"{name}@{count}"] = command
    results = {}
    for name, command in steps.items():
        results[name] = run_measured(command, env, work / f"{name}.log")
        if verbose:
            figures = results[name]
            print(f"  {name:18s} {figures['seconds']:8.1f} s  peak {figures['peak_mb']:8.1f} MB", flush=True)
    return results


def growth(results: dict, questions: tuple[int, int]) -> dict[str, float]:
    """Peak MB at the larger question count minus at the smaller, per growing phase."""
    low, high = questions
    return {phase: round(results[f"{phase}@{high}"]["peak_mb"] - results[f"{phase}@{low}"]["peak_mb"], 1)
            for phase in GROWING_PHASES if f"{phase}@{high}" in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b-untied"], choices=SHAPES)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--questions", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real_shapes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of all figures")
    args = parser.parse_args()
    report = {}
    for name in args.shapes:
        shape, overrides = SHAPES[name]
        model = args.work / f"{name}-{args.layers}l"
        if not model.exists():
            build_real_shape_model(model, shape, num_layers=args.layers, **overrides)
        print(f"{name} ({args.layers} layers, {args.dtype}, eval batch {args.eval_batch}):", flush=True)
        results = measure(model, args.work / f"{name}-{args.dtype}", args.dtype, tuple(args.questions),
                          args.eval_batch, args.new_tokens)
        report[name] = {"phases": results, "growth_mb": growth(results, tuple(args.questions))}
        print(f"  peak growth {args.questions[0]} -> {args.questions[1]} questions (MB): {report[name]['growth_mb']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
