"""The one device check (issues 21 and 25), for a bare GPU machine: it installs what the machine
lacks from ``.whl/``, builds a Qwen2.5-1.5B-shaped random bfloat16 model, then runs, in this order
(the most important first), each step in its own process:

1. ``fit_zero2``: ``svdecode fit`` of that model under DeepSpeed ZeRO-2 (LoRA, 4 steps), whose fit
   end extracts the vector on the GPU, beside one timed forward pass of the same calibration data
   (``benchmarks/fit_end_probe.py``); then ``svdecode test`` reading the vector;
2. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (bf16 scoring, packed vs padded, steered
   decoding, fit + test + predict under no strategy, DDP, ZeRO-2 and ZeRO-3 in both modes);
3. ``extraction``: ``steering_extraction.py`` (our pass, the forward floor and the naive version);
4. ``generation_batch_1`` / ``generation_batch_16``: decoding speed of every variant (merged/unmerged,
   compiled/eager, one/two passes) beside lm-eval's ``generate_until`` and the bandwidth limit (issue 28);
5. ``truthfulqa_mc``: ``svdecode test`` against lm-evaluation-harness on generated questions.

    python3 benchmarks/device_check.py --out $OUT/device_check.json      # on the GPU machine
    python benchmarks/device_check.py --dry-run                          # here: every step on the CPU

The whole check ends within ``--deadline`` seconds (400 on a GPU, so under 7 minutes with the
start-up): each step runs under the smaller of its own budget and the time left, a step with no time
left is skipped, and the summary file is rewritten after every step, so a run cut short still
reports what it did. ``benchmarks/README.md`` ("Device check") gives each step's expected time on an
H200, the wheels and the command that collects them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine lacks, by the module each path imports: DeepSpeed and jsonargparse (the CLI,
#: ZeRO), datasets and rouge-score (lm-eval's TruthfulQA tasks), lm-eval (the MC reference).
NEEDED = ("deepspeed", "jsonargparse", "docstring_parser", "typeshed_client", "datasets", "rouge_score", "nltk",
          "lm_eval")
#: Qwen2.5-1.5B's configuration (random weights); the dry run keeps its vocabulary (the extraction
#: benchmark draws ids below it).
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768)
DRY = dict(QWEN_1_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
#: Each step's own limit in seconds on the GPU (the dry run multiplies them by 4); the deadline bounds
#: the sum. Expected H200 times are in benchmarks/README.md.
BUDGET = {"build_model": 60, "fit_zero2": 150, "gpu_tests": 200, "extraction": 75, "generation_batch_1": 240,
          "generation_batch_16": 240, "truthfulqa_mc": 100}


#: The variants issue 28's goals compare (today's eager decoding, the compiled ones, lm-eval).
GENERATION_VARIANTS = ["plain/unmerged/eager", "plain/merged/compiled", "static/merged/compiled",
                       "dynamic/one-pass/eager", "dynamic/one-pass/compiled", "lm-eval"]


def install_wheels(dry_run: bool, workdir: Path) -> dict:
    """The carried wheels (``.whl/``) installed into this interpreter's own environment, where every
    process it starts finds them whatever its ``PYTHONPATH`` (pip ``--no-deps``: ``.whl/`` holds each
    missing requirement too). The dry run installs them into a scratch folder for the GPU machine's
    Python (3.12) instead, which checks that the set installs there without touching this one."""
    missing = [module for module in NEEDED if importlib.util.find_spec(module) is None]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    step: dict = {"missing": missing, "wheels": len(wheels),
                  "wheel_mb": round(sum(map(os.path.getsize, wheels)) / 2**20, 1)}
    if not wheels:
        step["note"] = "no .whl/: missing packages stay missing" if missing else "none needed"
        return step
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check"]
    if dry_run:
        command += ["--target", str(workdir / "wheel-check"), "--python-version", "3.12", "--only-binary=:all:",
                    "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
    else:
        wheels = [w for w in wheels if not _installed(Path(w).name)]
    if wheels:
        done = subprocess.run([*command, *wheels], capture_output=True, text=True)
        step.update(rc=done.returncode, installed=len(wheels), output_tail=(done.stdout + done.stderr)[-2000:])
    importlib.invalidate_caches()
    step["still_missing"] = [module for module in NEEDED if importlib.util.find_spec(module) is None]
    return step


def _installed(wheel_name: str) -> bool:
    """Whether the distribution of a wheel file is installed at the wheel's version."""
    name, version = wheel_name.split("-")[:2]
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


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


def write_mc_questions(path: Path, count: int) -> Path:
    """Generated TruthfulQA-like questions in mc_task.json form (the GPU machine has no shared data)."""
    from svdecode_pl.corpus.synthetic import synthetic_questions

    rows = [{"question": q.question, "mc1_targets": dict(zip(q.mc1_choices, q.mc1_labels)),
             "mc2_targets": dict(zip(q.mc2_choices, q.mc2_labels))} for q in synthetic_questions(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def run_step(name: str, commands: list[list[str]], env: dict[str, str], timeout: float) -> dict:
    """Run a step's commands one after the other within ``timeout`` seconds: wall time, exit status and
    the output's tail. A command that runs out of time is killed with its whole process group (a
    test's DeepSpeed child left behind would hold the rendezvous port and hang the next step)."""
    start, output, rc = time.perf_counter(), "", 0
    for command in commands:
        left = timeout - (time.perf_counter() - start)
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        try:
            out, _ = child.communicate(timeout=max(left, 1.0))
            rc = child.returncode
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            rc, out = 124, f"{out or ''}\ntimed out after {timeout:.0f}s (step budget or the check's deadline)"
        output += out or ""
        if rc != 0:
            break
    seconds = round(time.perf_counter() - start, 1)
    print(f"[{name}] rc {rc}, {seconds} s", flush=True)
    return {"rc": rc, "seconds": seconds, "output_tail": output[-4000:]}


def fit_commands(model_dir: Path, run_dir: Path, device: str) -> list[list[str]]:
    """``svdecode fit`` (with the forward-floor probe) then ``svdecode test`` of the model under
    DeepSpeed ZeRO-2: 64 generated questions, 32 to warm-start (4 steps of 8) and calibrate, 16 for
    the held-out mu* and the validation curve, 16 to test."""
    gpu = device == "cuda"
    strategy = "deepspeed_zero2.yaml" if gpu else "deepspeed_zero2_cpu.yaml"
    common = [sys.executable, "-m", "svdecode_pl.cli", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--config", str(ROOT / "configs" / "strategy" / strategy), "--model.name_or_path", str(model_dir),
              "--model.dtype", "bfloat16" if gpu else "float32", "--trainer.accelerator", "gpu" if gpu else "cpu",
              "--trainer.devices", "1", "--trainer.default_root_dir", str(run_dir),
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
              "--data.synthetic_questions", "64", "--data.train_fraction", "0.5", "--data.val_fraction", "0.25",
              "--data.batch_size", "8", "--data.eval_batch_size", "8"]
    fit = [*common[:3], "fit", *common[3:], "--trainer.max_steps", "4",
           "--trainer.callbacks+=benchmarks.fit_end_probe.ForwardFloor"]
    test = [*common[:3], "test", *common[3:], "--model.adapter_path", str(run_dir / "adapter")]
    return [fit, test]


def fit_end_figures(run_dir: Path) -> dict:
    """The fit end's device and seconds (the vector's metadata) beside the forward floor, and
    whether ``test`` steered with that vector."""
    figures: dict = {}
    vector_file, floor_file = run_dir / "steering" / "steering_vector.json", run_dir / "forward_floor.json"
    if vector_file.exists():
        metadata = json.loads(vector_file.read_text())["metadata"]
        figures.update(extraction=metadata.get("extraction"), token_count=metadata.get("token_count"))
    if floor_file.exists():
        figures["forward_floor"] = json.loads(floor_file.read_text())
    if figures.get("extraction") and figures.get("forward_floor"):
        figures["calibration_over_forward"] = round(
            figures["extraction"]["calibration_seconds"] / max(figures["forward_floor"]["seconds"], 1e-9), 3)
    results = run_dir / "results.json"
    if results.exists() and vector_file.exists():
        steering = json.loads(results.read_text()).get("steering") or {}
        figures["test_read_the_vector"] = steering.get("mu_star") == metadata.get("mu_star")
    return figures


def steps(model_dir: Path, workdir: Path, device: str, dry_run: bool) -> dict[str, list[list[str]]]:
    """Each step's commands (smaller in the dry run), in the order they run."""
    py = sys.executable
    seq_len = "64" if dry_run else "512"
    generation = [py, "benchmarks/generation.py", "--model", str(model_dir), "--device", device,
                  "--dtype", "bfloat16" if device == "cuda" else "float32", "--new-tokens", "8" if dry_run else "64",
                  "--repeat", "1", "--variants", *GENERATION_VARIANTS]
    mc_questions = write_mc_questions(workdir / "mc_task.json", 64)
    return {
        "fit_zero2": fit_commands(model_dir, workdir / "fit_zero2", device),
        "gpu_tests": [[py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]],
        # extraction against one forward pass of the adapted and the base model, on the device
        "extraction": [[py, "benchmarks/steering_extraction.py", "--model-dir", str(model_dir), "--device", device,
                        "--dtype", "bfloat16", "--sizes", "4", "--naive-sizes", "4", "--time-size", "4",
                        "--seq-len", seq_len, "--repeat", "2"]],
        "generation_batch_1": [[*generation, "--batches", "1", "--prompts", "2",
                                "--json-out", str(workdir / "generation_batch_1.json")]],
        "generation_batch_16": [[*generation, "--batches", "16", "--prompts", "16",
                                 "--json-out", str(workdir / "generation_batch_16.json")]],
        "truthfulqa_mc": [[py, "benchmarks/truthfulqa_mc.py", "--model-dir", str(model_dir), "--device", device,
                           "--data", str(mc_questions), "--limit", "8" if dry_run else "32", "--repeats", "1",
                           "--lm-eval-python", py, "--skip-floor"]],
    }


class Summary:
    """The check's summary file, rewritten (atomically) after every step."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.data = path, {**header, "steps": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, step: dict, elapsed: float) -> None:
        self.data["steps"][name] = step
        self.data["elapsed_seconds"] = round(elapsed, 1)
        self.data["failed"] = [n for n, s in self.data["steps"].items() if s.get("rc", 0) != 0]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "device_check.json")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "device_check")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole check (default 400 on a GPU, 2400 in the dry run)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (after the model's build)")
    parser.add_argument("--build-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_model:  # the build_model step's own process
        return print(build_model(args.build_model, DRY if args.dry_run else QWEN_1_5B, args.device))
    start = time.perf_counter()
    deadline = args.deadline or (2400.0 if args.dry_run else 400.0)
    wheels = install_wheels(args.dry_run, args.workdir)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        raise SystemExit(2)
    device = "cpu" if args.dry_run else "cuda"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if args.dry_run:
        env["SVDECODE_TEST_DEVICE"] = "cpu"
    summary = Summary(args.out, {"dry_run": args.dry_run, "deadline_seconds": deadline, "torch": torch.__version__,
                                 "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    summary.record("wheels", wheels, time.perf_counter() - start)
    model_dir = args.workdir / "qwen2.5-1.5b-shape"
    build = [sys.executable, __file__, "--build-model", str(model_dir), "--device", device]
    plan = {"build_model": [build + (["--dry-run"] if args.dry_run else [])],
            **steps(model_dir, args.workdir, device, args.dry_run)}
    for name, commands in plan.items():
        left = deadline - (time.perf_counter() - start)
        if args.only and name != "build_model" and name not in args.only:
            continue
        if left < 15:
            summary.record(name, {"rc": 125, "skipped": f"no time left ({left:.0f} s of the deadline)"},
                           time.perf_counter() - start)
            continue
        step = run_step(name, commands, env, min(BUDGET[name] * (4 if args.dry_run else 1), left))
        if name == "fit_zero2":
            step["fit_end"] = fit_end_figures(args.workdir / "fit_zero2")
        if name.startswith("generation") and (args.workdir / f"{name}.json").exists():
            step["figures"] = json.loads((args.workdir / f"{name}.json").read_text())
        summary.record(name, step, time.perf_counter() - start)
    failed = summary.data["failed"]
    print(f"summary written to {args.out} after {time.perf_counter() - start:.0f} s; failed steps: {failed or 'none'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
