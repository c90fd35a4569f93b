"""The warm-start-length ablation on the pre-trained miniature (README, "Which strength"): for each
warm-start length, seed and mode, ``svdecode fit`` + ``svdecode test`` with the task's quickstart
config (MC: configs/quickstart.yaml; generation: configs/truthfulqa_gen/quickstart.yaml), then a
table (mean and spread over seeds of the task's metrics, plain and at every strength estimate) and a
figure. Cells run in the order given, so a cut-short run still leaves whole lengths.

    python benchmarks/miniature_ablation.py --out runs/miniature_ablation --steps 20 5 80 --seeds 0 1 2
    python benchmarks/miniature_ablation.py --task gen --out runs/miniature_ablation_gen --steps 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: task -> (its quickstart config, the metrics the table shows; the first is the figure's)
TASKS = {
    "mc": (ROOT / "configs" / "quickstart.yaml", ("mc2", "mc1")),
    "gen": (ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml", ("bleu_acc", "rougeL_acc", "bleu_max")),
}
CONFIG, METRICS = TASKS["mc"]
ESTIMATES = ("mu_star", "mu_star_heldout", "mu_star_filtered", "validation_best")


def run_cell(out: Path, steps: int, seed: int, mode: str) -> dict:
    """One fit + test; returns its results.json (reused when present)."""
    run_dir = out / f"steps{steps}_{mode}_seed{seed}"
    results = run_dir / "results.json"
    if not results.exists():
        common = ["--config", str(CONFIG), "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed),
                  "--trainer.enable_progress_bar", "false", "--steering.mode", mode]
        cli = [sys.executable, "-m", "svdecode_pl.cli"]
        subprocess.run([*cli, "fit", *common, "--trainer.max_steps", str(steps)], check=True, capture_output=True)
        subprocess.run([*cli, "test", *common, "--model.adapter_path", str(run_dir / "adapter")], check=True,
                       capture_output=True)
    return json.loads(results.read_text())


def cell_values(result: dict) -> dict[str, dict]:
    """plain and each estimate: mu and the table's metrics (in %, bleu_max as is)."""
    scale = {m: 1 if m.endswith("_max") else 100 for m in METRICS}
    rows = {"plain": {"mu": 0.0, **{m: scale[m] * result["metrics"][m]["plain"] for m in METRICS}}}
    for name, entry in result["steering"]["estimates"].items():
        metrics = entry["metrics"] or {}
        rows[name] = {"mu": entry["mu"], **{m: None if metrics.get(m) is None else scale[m] * metrics[m]
                                            for m in METRICS}}
    return rows


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def table(cells: dict[tuple[int, str], list[dict]]) -> str:
    """A markdown table: one row per (length, mode, plain or estimate)."""
    lines = ["| steps | mode | strength | mu (mean ± sd) | " + " | ".join(METRICS) + " | seeds |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for (steps, mode), runs in cells.items():
        for name in ("plain", *ESTIMATES):
            column = [cell_values(r)[name] for r in runs]
            values = " | ".join(spread([c[m] for c in column]) for m in METRICS)
            mu = spread([c["mu"] for c in column])
            lines.append(f"| {steps} | {mode} | {name} | {mu} | {values} | {len(runs)} |")
    return "\n".join(lines)


def figure(cells: dict[tuple[int, str], list[dict]], path: Path) -> None:
    """The first metric's gain over plain (mean and sd over seeds) at each estimate, per warm-start
    length and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({mode for _, mode in cells}, key=lambda mode: mode != "static")
    key = METRICS[0]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lengths = sorted(steps for steps, m in cells if m == mode)
        for name in ESTIMATES:
            means, sds = [], []
            for steps in lengths:
                gains = [cell_values(r)[name][key] - cell_values(r)["plain"][key] for r in cells[(steps, mode)]
                         if cell_values(r)[name][key] is not None]
                means.append(statistics.mean(gains) if gains else float("nan"))
                sds.append(statistics.stdev(gains) if len(gains) > 1 else 0.0)
            ax.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, label=name)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(s) for s in lengths])
        ax.set_title(f"{mode} steering")
        ax.set_xlabel("warm-start steps")
    axes[0][0].set_ylabel(f"{key} steered - plain (points)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "miniature_ablation")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 5, 80])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["static", "dynamic"])
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--task", choices=sorted(TASKS), default="mc")
    args = parser.parse_args()
    global CONFIG, METRICS
    CONFIG, METRICS = TASKS[args.task]
    cells: dict[tuple[int, str], list[dict]] = {}
    for steps in args.steps:
        for mode in args.modes:
            for seed in args.seeds:
                cells.setdefault((steps, mode), []).append(run_cell(args.out, steps, seed, mode))
                print(f"done: {steps} steps, {mode}, seed {seed}", flush=True)
            (args.out / "table.md").write_text(table(cells) + "\n")
    print(table(cells))
    figure(cells, args.figure or args.out / "ablation.png")


if __name__ == "__main__":
    main()
