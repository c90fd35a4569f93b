"""TEST HELPER: ``svdecode fit``, ``test`` and ``predict`` one after the other, for each steering mode,
under one strategy (``tests/test_gpu.py`` runs one of these per strategy, at once). Each command is its
own process, as a user runs them (a second ``deepspeed.zero.Init`` in one process breaks modules that
transformers' hub-kernel decorators wrap).

    python tests/scripts/gpu_pipeline.py RUN_DIR DEVICE [--config STRATEGY.yaml ...]

``RUN_DIR/<mode>`` gets the run's adapter, vector, results.json and predictions.jsonl. DEVICE is
``cuda`` (one GPU) or ``cpu`` (the device check's dry run). Exits with the first failing command's status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "svdecode_pl.cli", *args], cwd=ROOT)
    if done.returncode != 0:
        print(f"failed ({done.returncode}): svdecode {' '.join(args)}", flush=True)
        sys.exit(done.returncode)

#: 24 generated questions: 12 warm-start, 6 validation (held-out mu* and the curve), 6 test
DATA = ["--data.synthetic_questions", "24", "--data.train_fraction", "0.5", "--data.val_fraction", "0.25",
        "--data.batch_size", "4", "--data.eval_batch_size", "4"]


def main(run_dir: Path, device: str, strategy: list[str]) -> None:
    for mode in ("static", "dynamic"):
        root = run_dir / mode
        common = ["--config", str(ROOT / "configs" / "quickstart.yaml"), *strategy,
                  "--model.name_or_path", "svdecode-tiny", *DATA, "--trainer.default_root_dir", str(root),
                  "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
                  "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                  "--steering.mode", mode, "--steering.mu_grid", "[-1.0, 0.0, 1.0]"]
        run_cli(["fit", *common, "--trainer.max_steps", "2"])
        adapter = ["--model.adapter_path", str(root / "adapter")]
        run_cli(["test", *common, *adapter])
        run_cli(["predict", *common, *adapter, "--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"])
        print(f"{mode}: fit, test and predict done in {root}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
