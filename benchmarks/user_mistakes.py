"""The user mistakes of issue 29, each run as a user would run it (the real ``svdecode`` command in
a subprocess, on the quickstart config made small), with its exit status, the number of lines it
printed and its last line; ``--table`` prints docs/user_mistakes.md's table from two such runs.

    python benchmarks/user_mistakes.py --label before --out /tmp/before.json
    python benchmarks/user_mistakes.py --label after --out /tmp/after.json
    python benchmarks/user_mistakes.py --table /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QS = str(ROOT / "configs" / "quickstart.yaml")
GEN = str(ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml")
SMALL = ["--data.init_args.synthetic_questions", "40", "--trainer.max_steps", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
BIN = Path(sys.executable).parent
KILLER = '''
import os, signal
from lightning.pytorch import Callback


class KillAfterBatches(Callback):
    """SIGKILL the run once two predict batches are written (the first time only)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx >= 1 and not os.path.exists("killed"):
            open("killed", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
'''


def svdecode(work: Path, *args: str, env: dict | None = None, wait: bool = True, prefix: str = ""):
    """Run ``svdecode ARGS`` in ``work``: (exit status, stdout + stderr), or the Popen when not waiting."""
    full = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1", **(env or {})}
    full.pop("SVDECODE_DEBUG", None)
    command = [str(BIN / "svdecode"), *args]
    if prefix:
        command = ["bash", "-c", f"{prefix} exec \"$0\" \"$@\"", *command]
    process = subprocess.Popen(command, cwd=work, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    if not wait:
        return process
    out, _ = process.communicate(timeout=900)
    return process.returncode, out


def python(work: Path, code: str) -> tuple[int, str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=full, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "-"


def fit(work: Path, run: str, *extra: str) -> None:
    code, out = svdecode(work, "fit", "--config", QS, *SMALL, "--trainer.default_root_dir", run, *extra)
    if code != 0:
        raise SystemExit(f"setup fit {run} failed:\n{out[-3000:]}")


def setup(work: Path) -> dict:
    """The runs the cases start from: A and B (two seeds), one of another model, one of IA3."""
    fit(work, "runs/A")
    fit(work, "runs/B", "--seed_everything", "1")
    fit(work, "runs/tiny", "--model.name_or_path", "svdecode-tiny")
    fit(work, "runs/ia3", "--config", str(ROOT / "configs" / "peft" / "ia3.yaml"))
    (work / "killer.py").write_text(KILLER)
    (work / "nan_mu.yaml").write_text("steering:\n  strength: .nan\n")
    (work / "twice.yaml").write_text(
        "model:\n  adapter_path: runs/A/adapter\ntrainer:\n  max_steps: 2\nmodel:\n  learning_rate: 0.01\n")
    one = {"question": "Does a broken mirror bring bad luck?", "mc1_targets": {"No.": 1, "Yes.": 0},
           "mc2_targets": {"No.": 1, "Yes.": 0}}
    (work / "one.json").write_text(json.dumps([one]))
    long = dict(one, question=" ".join(["why"] * 3000) + "?")
    (work / "long.json").write_text(json.dumps([one] * 3 + [long]))
    (work / "one.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers\n"
                                  "Adversarial,Superstitions,Does a broken mirror bring bad luck?,No.,No.,Yes.\n")
    many = [dict(one, question=f"{i} " + "mirror " * 1500) for i in range(200)]
    (work / "long200.json").write_text(json.dumps(many))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    rows = [("What is the capital of France?", ["Paris", "London"]), ("What do cows drink?", ["Water", "Oil"])]
    (tasks / "data.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n"
                                              for q, c in rows))
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\ndoc_to_text: 'Q: {{question}}\\nA:'\noutput_type: multiple_choice\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    code, out = python(work, "from svdecode_pl.models.loading import resolve_name_or_path as r; "
                             "print(r('svdecode-mini'))")
    return {"mini": out.strip().splitlines()[-1]}


def test_args(root: str, *extra: str, adapter: str | None = "runs/A/adapter") -> list[str]:
    return ["test", "--config", QS, *SMALL, "--trainer.default_root_dir", root,
            *(["--model.adapter_path", adapter] if adapter else []), *extra]


def lm_eval(work: Path, setup_info: dict, model_args: str) -> tuple[int, str]:
    args = f"pretrained={setup_info['mini']},peft=runs/A/adapter,steering=runs/A/adapter,{model_args}"
    return svdecode(work, "lm-eval", "--model_args", args, "--tasks", "tiny_mc", "--include_path",
                    str(work / "tasks"), "--device", "cpu", "--batch_size", "2")


def case_predict_resumed(work: Path) -> tuple[int, str, str]:
    run = "runs/P"
    shutil.copytree(work / "runs/A", work / run)
    base = ["predict", "--config", QS, *SMALL, "--trainer.default_root_dir", run, "--model.adapter_path",
            f"{run}/adapter", "--data.init_args.eval_batch_size", "2",
            "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"]
    svdecode(work, *base, "--steering.strength", "1", "--trainer.callbacks+=killer.KillAfterBatches")
    code, out = svdecode(work, *base, "--steering.strength", "5")
    resumed = [line for line in out.splitlines() if "resuming" in line]
    return code, out, f"resumed: {resumed[0] if resumed else 'no'}"


def case_two_fits(work: Path) -> tuple[int, str, str]:
    args = ["fit", "--config", QS, *SMALL, "--trainer.max_steps", "6", "--trainer.default_root_dir", "runs/C"]
    first = svdecode(work, *args, wait=False)
    time.sleep(4)
    code, out = svdecode(work, *args, "--seed_everything", "1")
    first_out, _ = first.communicate(timeout=900)
    adapter = digest(work / "runs/C/adapter/adapter_model.safetensors")
    return code, out, f"first fit exit {first.returncode}; adapter {adapter}"


def case_second_fit(work: Path) -> tuple[int, str, str]:
    shutil.copytree(work / "runs/A", work / "runs/A2")
    before = digest(work / "runs/A2/adapter/adapter_model.safetensors")
    code, out = svdecode(work, "fit", "--config", QS, *SMALL, "--trainer.default_root_dir", "runs/A2",
                         "--seed_everything", "1")
    after = digest(work / "runs/A2/adapter/adapter_model.safetensors")
    return code, out, f"adapter {'replaced' if before != after else 'kept'}"


def case_stale_lock(work: Path) -> tuple[int, str, str]:
    (work / "runs/D").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (work / "runs/D/.svdecode.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    code, out = svdecode(work, "fit", "--config", QS, *SMALL, "--trainer.default_root_dir", "runs/D")
    return code, out, f"adapter written: {(work / 'runs/D/adapter').is_dir()}"


def case_interrupted_fit(work: Path) -> tuple[int, str, str]:
    shutil.copytree(work / "runs/A/checkpoints", work / "runs/E/checkpoints")
    code, out = svdecode(work, "fit", "--config", QS, *SMALL, "--trainer.default_root_dir", "runs/E")
    ckpts = sorted(p.name for p in (work / "runs/E/checkpoints").iterdir())
    return code, out, f"checkpoints: {' '.join(ckpts)}"


def case_root_of_other_run(work: Path) -> tuple[int, str, str]:
    before = digest(work / "runs/B/results.json")
    code, out = svdecode(work, *test_args("runs/B"))
    return code, out, f"runs/B/results.json {'written' if digest(work / 'runs/B/results.json') != before else 'kept'}"


def simple(*args: str, env: dict | None = None, prefix: str = ""):
    def run(work: Path) -> tuple[int, str, str]:
        code, out = svdecode(work, *args, env=env, prefix=prefix)
        return code, out, ""
    return run


def code_case(code: str):
    def run(work: Path) -> tuple[int, str, str]:
        status, out = python(work, code)
        return status, out, ""
    return run


def lm_eval_case(model_args: str):
    def run(work: Path, info: dict) -> tuple[int, str, str]:
        code, out = lm_eval(work, info, model_args)
        return code, out, ""
    run.needs_info = True
    return run


LOAD_NAN = ("from svdecode_pl.integrations.artifact import load_steered; "
            "m = load_steered('runs/A/adapter', mu=float('nan')); print(m.steering_vector)")
SAVE_NAN = ("import torch; from svdecode_pl.steering.vector import SteeringVector as S; "
            "S(torch.ones(4), float('nan')).save('nan_vec'); print(S.load('nan_vec'))")
CKPT = ["fit", "--config", QS, *SMALL]

#: (id, class, what the user did, the command in short, how to run it)
CASES = [
    ("1a", 1, "test: run A's adapter, run B's directory", "test --model.adapter_path runs/A/adapter "
     "--trainer.default_root_dir runs/B", case_root_of_other_run),
    ("1b", 1, "test: another run's vector (--steering.dirpath)", "test --model.adapter_path runs/A/adapter "
     "--steering.dirpath runs/B --trainer.default_root_dir runs/new1",
     simple(*test_args("runs/new1", "--steering.dirpath", "runs/B"))),
    ("1c", 1, "test: no adapter beside a fitted vector", "test --trainer.default_root_dir runs/A (no adapter_path)",
     simple(*test_args("runs/A", adapter=None))),
    ("1d", 1, "predict killed at mu 1, re-run at mu 5",
     "predict --steering.strength 1 (killed) then --steering.strength 5",
     case_predict_resumed),
    ("1e", 1, "second fit into a finished run", "fit --trainer.default_root_dir runs/A2 (finished run)",
     case_second_fit),
    ("1f", 1, "two fits at once into one directory", "fit ... runs/C & fit ... runs/C", case_two_fits),
    ("1g", 1, "stale lock of a dead process", "fit into runs/D holding a dead pid's lock", case_stale_lock),
    ("1h", 1, "interrupted fit re-run without --ckpt_path", "fit --trainer.default_root_dir runs/E (last.ckpt there)",
     case_interrupted_fit),
    ("1i", 1, "--ckpt_path of another model", "fit --ckpt_path runs/tiny/checkpoints/last.ckpt",
     simple(*CKPT, "--trainer.default_root_dir", "runs/F1", "--ckpt_path", "runs/tiny/checkpoints/last.ckpt")),
    ("1j", 1, "--ckpt_path of another PEFT method", "fit --ckpt_path runs/ia3/checkpoints/last.ckpt",
     simple(*CKPT, "--trainer.default_root_dir", "runs/F2", "--ckpt_path", "runs/ia3/checkpoints/last.ckpt")),
    ("2a", 2, "config file: steering.strength .nan", "test --config nan_mu.yaml",
     simple(*test_args("runs/A", "--config", "nan_mu.yaml"))),
    ("2b", 2, "--steering.strength 1e400", "test --steering.strength 1e400",
     simple(*test_args("runs/A", "--steering.strength", "1e400"))),
    ("2c", 2, "lm-eval model_args mu=nan", "lm-eval --model_args ...,mu=nan", lm_eval_case("mu=nan")),
    ("2d", 2, "load_steered(mu=nan)", "python: load_steered('runs/A/adapter', mu=nan)", code_case(LOAD_NAN)),
    ("2e", 2, "logit-bias --mu nan", "logit-bias runs/A/adapter --mu nan",
     simple("logit-bias", "runs/A/adapter", "--mu", "nan")),
    ("2f", 2, "SteeringVector(mu=nan).save()", "python: SteeringVector(d, nan).save(); load()", code_case(SAVE_NAN)),
    ("2g", 2, "fit --steering.confidence_threshold 1.5", "fit --steering.confidence_threshold 1.5",
     simple(*CKPT, "--trainer.default_root_dir", "runs/G", "--steering.confidence_threshold", "1.5")),
    ("2h", 2, "logit-bias --clamp -5", "logit-bias runs/A/adapter --clamp -5",
     simple("logit-bias", "runs/A/adapter", "--clamp", "-5")),
    ("2i", 2, "config file with two model: keys", "test --config twice.yaml",
     simple("test", "--config", QS, "--config", "twice.yaml", *SMALL, "--trainer.default_root_dir", "runs/A")),
    ("2j", 2, "zero batch size", "fit --data.init_args.batch_size 0",
     simple(*CKPT, "--trainer.default_root_dir", "runs/H", "--data.init_args.batch_size", "0")),
    ("2k", 2, "zero eval batch size", "test --data.init_args.eval_batch_size 0",
     simple(*test_args("runs/A", "--data.init_args.eval_batch_size", "0"))),
    ("2l", 2, "zero chunk size", "test --model.chunk_tokens 0",
     simple(*test_args("runs/A", "--model.chunk_tokens", "0"))),
    ("2m", 2, "--model.learning_rate nan", "fit --model.learning_rate nan",
     simple(*CKPT, "--trainer.default_root_dir", "runs/I", "--model.learning_rate", "nan")),
    ("2n", 2, "a NaN in --steering.mu_grid", "test --steering.mu_grid '[1, .nan]'",
     simple(*test_args("runs/A", "--steering.mu_grid", "[1, .nan]"))),
    ("2o", 2, "lm-eval model_args mu_scale=inf", "lm-eval --model_args ...,mu_scale=inf", lm_eval_case("mu_scale=inf")),
    ("3a", 3, "empty test split", "test --data.init_args.train_fraction 1.0 --data.init_args.val_fraction 0",
     simple(*test_args("runs/A", "--data.init_args.train_fraction", "1.0", "--data.init_args.val_fraction", "0"))),
    ("3e", 3, "fractions 0.8 + 0.2 (float rounding)",
     "test --data.init_args.train_fraction 0.8 --data.init_args.val_fraction 0.2",
     simple(*test_args("runs/A", "--data.init_args.train_fraction", "0.8", "--data.init_args.val_fraction", "0.2"))),
    ("3b", 3, "a question beyond the model's context", "test --data.init_args.path long.json (one of 3000+ tokens)",
     simple(*test_args("runs/A", "--data.init_args.path", "long.json", "--data.init_args.train_fraction", "0",
                       "--data.init_args.val_fraction", "0"))),
    ("3c", 3, "one-question data file", "test --data.init_args.path one.json",
     simple(*test_args("runs/A", "--data.init_args.path", "one.json"))),
    ("3f", 3, "one-question TruthfulQA.csv (with its category)", "test --data.init_args.path one.csv",
     simple(*test_args("runs/A", "--data.init_args.path", "one.csv"))),
    ("3d", 3, "generation test with 4 questions", "test --config truthfulqa_gen/quickstart.yaml synthetic 4",
     simple("test", "--config", GEN, *SMALL, "--data.init_args.synthetic_questions", "4",
            "--data.init_args.generation.max_new_tokens", "4", "--trainer.default_root_dir", "runs/gen4")),
    ("5a", 5, "push with the Hub unreachable", "HF_ENDPOINT=http://127.0.0.1:9 push runs/A user/repo",
     simple("push", "runs/A", "user/repo", env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                                                "HF_TOKEN": "hf_dummy"})),
    ("5b", 5, "lm-eval model_args typo", "lm-eval --model_args ...,steerng=x", lm_eval_case("steerng=x")),
    ("5c", 5, "unsupported PEFT method", "fit --model.peft peft.LoHaConfig",
     simple(*CKPT, "--trainer.default_root_dir", "runs/J", "--model.peft", "peft.LoHaConfig")),
    ("5d", 5, "--ckpt_path a safetensors file", "fit --ckpt_path runs/A/adapter/adapter_model.safetensors",
     simple(*CKPT, "--trainer.default_root_dir", "runs/K", "--ckpt_path", "runs/A/adapter/adapter_model.safetensors")),
    ("5e", 5, "--ckpt_path a text file", "fit --ckpt_path nan_mu.yaml",
     simple(*CKPT, "--trainer.default_root_dir", "runs/K2", "--ckpt_path", "nan_mu.yaml")),
    ("5f", 5, "out of memory", "ulimit -v 4 GB; test 200 questions of 1500 tokens in one padded batch "
     "(--data.init_args.eval_batch_size 200 --model.score_batch_tokens 1000000000)",
     simple(*test_args("runs/new5", "--data.init_args.path", "long200.json", "--data.init_args.train_fraction", "0",
                       "--data.init_args.val_fraction", "0", "--data.init_args.eval_batch_size", "200",
                       "--model.score_batch_tokens", "1000000000"), prefix="ulimit -v 4000000;")),
    ("5g", 5, "--debug keeps the traceback", "fit --steering.confidence_threshold 1.5 --debug",
     simple(*CKPT, "--trainer.default_root_dir", "runs/G2", "--steering.confidence_threshold", "1.5", "--debug")),
]


def summary_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("svdecode: error", "svdecode: warning"))]
    pick = errors[0] if errors else (lines[-1] if lines else "")
    return pick if len(pick) <= 160 else pick[:157] + "..."


def run_cases(work: Path, only: list[str] | None) -> list[dict]:
    info = setup(work)
    results = []
    for case_id, klass, what, command, runner in CASES:
        if only and case_id not in only:
            continue
        started = time.time()
        status, out, note = runner(work, info) if getattr(runner, "needs_info", False) else runner(work)
        lines = len(out.splitlines())
        results.append({"id": case_id, "class": klass, "what": what, "command": command, "exit": status,
                        "lines": lines, "last": summary_line(out), "note": note,
                        "seconds": round(time.time() - started, 1)})
        (work / f"case_{case_id}.log").write_text(out)
        print(json.dumps(results[-1]), flush=True)
    return results


def table(before: list[dict], after: list[dict]) -> str:
    after_by_id = {r["id"]: r for r in after}
    rows = ["| # | mistake | command | before: exit, lines | before: last line | after: exit, lines | after: what "
            "it says |", "|---|---|---|---|---|---|---|"]
    for b in before:
        a = after_by_id.get(b["id"], {})
        cell = lambda r: "-" if not r else f"{r['exit']}, {r['lines']}" + (f" ({r['note']})" if r["note"] else "")  # noqa: E731
        said = lambda r, n: (r.get("last", "") if len(r.get("last", "")) <= n else r["last"][: n - 3] + "...").replace(  # noqa: E731
            "|", "\\|")
        rows.append(f"| {b['id']} | {b['what']} | `{b['command']}` | {cell(b)} | {said(b, 90)} | {cell(a)} "
                    f"| {said(a, 160)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/user_mistakes"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    opts = parser.parse_args()
    if opts.table:
        print(table(*(json.loads(p.read_text()) for p in opts.table)))
        return
    work = opts.work / opts.label
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = run_cases(work, opts.only)
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
