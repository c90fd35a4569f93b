"""The warm-start-length ablation on a pre-trained miniature (README, "Which strength"): for each
warm-start length, seed and mode (``chosen``: the default, the mode chosen on validation; ``static``
/ ``dynamic``: pinned), ``svdecode fit`` + ``svdecode test`` with the task's quickstart config (MC:
configs/quickstart.yaml; generation: configs/truthfulqa_gen/quickstart.yaml; ``--member``: a family
member's config on top), then a table (mean and spread over seeds of the task's metrics: plain, the
run's own choice, each mode's estimates, and the oracle: the best fixed (mode, mu) of the test
curves by the first two metrics' mean, an upper bound no rule can use) and a figure. Cells run in
the order given, so a cut-short run still leaves whole lengths.

    python benchmarks/miniature_ablation.py --out runs/miniature_ablation --steps 20 5 80 --seeds 0 1 2
    python benchmarks/miniature_ablation.py --task gen --out runs/miniature_ablation_gen --steps 20 --seeds 0 1 2
    python benchmarks/miniature_ablation.py --member svdecode-mini-gadgets --out runs/ablation_gadgets
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from svdecode_pl.steering.strength import ESTIMATES, MODES, Candidate, best_index

ROOT = Path(__file__).resolve().parents[1]
#: task -> (its quickstart config, the metrics the table shows; the first is the figure's)
TASKS = {
    "mc": (ROOT / "configs" / "quickstart.yaml", ("mc2", "mc1")),
    "gen": (ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml", ("bleu_acc", "rougeL_acc", "bleu_max")),
}
CONFIG, METRICS = TASKS["mc"]
#: the table's rows after plain: the run's own choice, each mode's estimates, the oracle
ROWS = ("choice", *(f"{name} ({mode})" for mode in MODES for name in ESTIMATES), "oracle")


def run_cell(out: Path, steps: int, seed: int, mode: str, member: str | None = None,
             extra: tuple[str, ...] = ()) -> dict:
    """One fit + test (``member``: a family member's config on top; ``extra``: more options for
    both); returns its results.json (reused when present)."""
    run_dir = out / f"steps{steps}_{mode}_seed{seed}"
    results = run_dir / "results.json"
    if not results.exists():
        fragment = [] if member is None else ["--config", str(ROOT / "configs" / "family" / f"{member}.yaml")]
        common = ["--config", str(CONFIG), *fragment, *extra, "--trainer.default_root_dir", str(run_dir),
                  "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
                  "--steering.mode", "null" if mode == "chosen" else mode]
        cli = [sys.executable, "-m", "svdecode_pl.cli"]
        subprocess.run([*cli, "fit", *common, "--trainer.max_steps", str(steps)], check=True, capture_output=True)
        subprocess.run([*cli, "test", *common, "--model.adapter_path", str(run_dir / "adapter")], check=True,
                       capture_output=True)
    return json.loads(results.read_text())


def oracle(result: dict) -> dict:
    """The best fixed (mode, mu) of the test curves by the mean of the first two metrics (ties: the
    project's one rule, smallest |mu| then static): its mode, mu and metrics."""
    points = [(Candidate(mode, mu), {m: curve["metrics"][m][i] for m in METRICS})
              for mode, curve in result.get("test_curves", {}).items() for i, mu in enumerate(curve["mu"])]
    values = [None if any(p[m] is None for m in METRICS[:2]) else sum(p[m] for m in METRICS[:2]) / 2
              for _, p in points]
    index = best_index([c for c, _ in points], values)
    if index is None:
        return {"mode": None, "mu": None, "metrics": None}
    return {"mode": points[index][0].mode, "mu": points[index][0].mu, "metrics": points[index][1]}


def cell_values(result: dict) -> dict[str, dict]:
    """plain, the run's choice, each mode's estimates and the oracle: mu and the table's metrics
    (in %, bleu_max as is)."""
    scale = {m: 1 if m.endswith("_max") else 100 for m in METRICS}

    def row(mu: float | None, metrics: dict | None) -> dict:
        return {"mu": mu, **{m: None if (metrics or {}).get(m) is None else scale[m] * metrics[m] for m in METRICS}}

    steering, best = result["steering"], oracle(result)
    rows = {"plain": row(0.0, {m: result["metrics"][m]["plain"] for m in METRICS}),
            "choice": row(steering["mu"], {m: result["metrics"][m]["steered"] for m in METRICS}),
            "oracle": row(best["mu"], best["metrics"])}
    for mode, estimates in steering["estimates"].items():
        for name, entry in estimates.items():
            rows[f"{name} ({mode})"] = row(entry["mu"], entry["metrics"])
    return rows


def spread(values: list[float | None]) -> str:
    """mean ± sample standard deviation."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.2g}"


def table(cells: dict[tuple[int, str], list[dict]]) -> str:
    """A markdown table: one row per (length, mode, plain / choice / estimate / oracle), and which
    modes the runs' choices and the oracles took."""
    lines = ["| steps | mode | strength | mu (mean ± sd) | " + " | ".join(METRICS) + " | seeds |",
             "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    empty = {"mu": None, **dict.fromkeys(METRICS)}
    for (steps, mode), runs in cells.items():
        for name in ("plain", *ROWS):
            column = [cell_values(r).get(name, empty) for r in runs]
            values = " | ".join(spread([c[m] for c in column]) for m in METRICS)
            mu = spread([c["mu"] for c in column])
            lines.append(f"| {steps} | {mode} | {name} | {mu} | {values} | {len(runs)} |")
        chosen = ", ".join(f"{r['steering']['mode']} {r['steering']['mu']:g}" for r in runs)
        best = ", ".join(f"{oracle(r)['mode']} {oracle(r)['mu']:g}" for r in runs)
        lines.append(f"| {steps} | {mode} | (mode, mu) per seed | choice: {chosen}; oracle: {best} |"
                     + " |" * len(METRICS) + " |")
    return "\n".join(lines)


def figure(cells: dict[tuple[int, str], list[dict]], path: Path) -> None:
    """The first metric's gain over plain (mean and sd over seeds) of the choice, the paper's mu* in
    each mode and the oracle, per warm-start length and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({mode for _, mode in cells}, key=("chosen", "static", "dynamic").index)
    key = METRICS[0]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lengths = sorted(steps for steps, m in cells if m == mode)
        for name in ("choice", "mu_star (static)", "mu_star (dynamic)", "oracle"):
            means, sds = [], []
            for steps in lengths:
                gains = [cell_values(r)[name][key] - cell_values(r)["plain"][key] for r in cells[(steps, mode)]
                         if cell_values(r).get(name, {}).get(key) is not None]
                means.append(statistics.mean(gains) if gains else float("nan"))
                sds.append(statistics.stdev(gains) if len(gains) > 1 else 0.0)
            ax.errorbar(lengths, means, yerr=sds, marker="o", capsize=3, label=name)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(s) for s in lengths])
        ax.set_title(f"mode {mode}")
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
    parser.add_argument("--modes", nargs="+", default=["chosen"], choices=["chosen", "static", "dynamic"])
    parser.add_argument("--member", default=None, help="a family member (configs/family/<member>.yaml)")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--task", choices=sorted(TASKS), default="mc")
    args = parser.parse_args()
    global CONFIG, METRICS
    CONFIG, METRICS = TASKS[args.task]
    cells: dict[tuple[int, str], list[dict]] = {}
    for steps in args.steps:
        for mode in args.modes:
            for seed in args.seeds:
                cells.setdefault((steps, mode), []).append(run_cell(args.out, steps, seed, mode, args.member))
                print(f"done: {steps} steps, {mode}, seed {seed}", flush=True)
            (args.out / "table.md").write_text(table(cells) + "\n")
    print(table(cells))
    figure(cells, args.figure or args.out / "ablation.png")


if __name__ == "__main__":
    main()
