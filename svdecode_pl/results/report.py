"""``svdecode report RUNS_DIR``: every ``results.json`` under a directory as the paper's tables and figures.

Writes ``RUNS_DIR/report/``:

* ``table_<family>.{md,csv,tex}``: the shape of the paper's Table 1, one row per run (model and
  PEFT method, plain) followed by its ``+ SVDecode`` row (steered) with the change in points;
  TruthfulQA: MC1/MC2/MC3/Avg and %Truth/%Info/%T*I/Avg (BLEU/ROUGE-L acc without judges);
  commonsense: accuracy per set and Avg. LaTeX uses ``booktabs``.
* ``figures/*.png``: each mode's test metrics against mu with every estimate and the steered
  (mode, mu) marked (runs with ``test_curves``), the metric against warm-start steps, plain and
  steered (runs that differ in their warm-start length only), TruthfulQA per-category bars and
  commonsense per-set bars.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svdecode_pl.models.peft_methods import method_name
from svdecode_pl.utils.errors import DataFormatError

#: (column header, task, metric) of each table family, in the paper's order
MC_COLUMNS = [("MC1", "truthfulqa_mc", "mc1"), ("MC2", "truthfulqa_mc", "mc2"), ("MC3", "truthfulqa_mc", "mc3")]
JUDGE_COLUMNS = [("%Truth", "truthfulqa_gen", "truth"), ("%Info", "truthfulqa_gen", "info"),
                 ("%T*I", "truthfulqa_gen", "truth_info")]
TEXT_COLUMNS = [("BLEU acc", "truthfulqa_gen", "bleu_acc"), ("ROUGE-L acc", "truthfulqa_gen", "rougeL_acc")]
#: the metric each task's figures show
PRIMARY = {"truthfulqa_mc": "mc1", "truthfulqa_gen": "bleu_acc", "commonsense": "accuracy",
           "prompt_completion": "exact_match"}
FIGSIZE, DPI = (6.4, 4.0), 100  # every figure is 640 x 400 pixels
NOTE = ("On the tiny embedded default model the effect of steering is near zero; the paper's gains are "
        "reported for Qwen2.5-1.5B/7B and LLaMA-3.1-8B.")


@dataclass
class Run:
    """One run's results.json."""

    path: Path
    name: str
    results: dict[str, Any]

    @property
    def task(self) -> str:
        return self.results["task"]

    @property
    def model(self) -> str:
        return (self.results.get("model") or {}).get("name_or_path") or "model"

    @property
    def method(self) -> str:
        return method_name((self.results.get("model") or {}).get("peft"))

    def metric(self, name: str, variant: str) -> float | None:
        return (self.results["metrics"].get(name) or {}).get(variant)

    @property
    def steered(self) -> bool:
        return self.results.get("steering") is not None


def collect(runs_dir: Path) -> list[Run]:
    """Every results.json under ``runs_dir`` (the report's own folder excluded), by path."""
    runs = []
    for path in sorted(runs_dir.rglob("results.json")):
        if "report" in path.relative_to(runs_dir).parts[:-1]:
            continue
        try:
            results = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(results, dict) or "task" not in results or "metrics" not in results:
            raise DataFormatError(f"{path}: field 'task'/'metrics': missing (not a svdecode results.json)")
        name = str(path.parent.relative_to(runs_dir)) if path.parent != runs_dir else path.parent.name
        runs.append(Run(path, name, results))
    return runs


# -- tables ---------------------------------------------------------------------------------------
@dataclass
class Table:
    family: str
    header: list[str]
    rows: list[list[str | float | None]]  # label, then values in %, then Avg
    kinds: list[str]  # "plain" or "steered" per row


def _columns(family: str, runs: list[Run]) -> list[tuple[str, str, str]]:
    if family == "commonsense":
        sets = sorted({name.split("/", 1)[1] for run in runs for name in run.results["metrics"] if "/" in name})
        return [(name, "commonsense", f"accuracy/{name}") for name in sets]
    columns = []
    if any(run.task == "truthfulqa_mc" for run in runs):
        columns += MC_COLUMNS
    if any(run.task == "truthfulqa_gen" for run in runs):
        judged = any(run.metric("truth", "plain") is not None for run in runs if run.task == "truthfulqa_gen")
        columns += JUDGE_COLUMNS if judged else TEXT_COLUMNS
    return columns


def _family(task: str) -> str:
    return "truthfulqa" if task.startswith("truthfulqa") else task


def tables(runs: list[Run]) -> list[Table]:
    """One table per task family; runs of the same model, method and run name share a row."""
    by_family: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_family[_family(run.task)].append(run)
    out = []
    for family, members in sorted(by_family.items()):
        columns = _columns(family, members)
        rows: dict[tuple[str, str, str], dict[str, Run]] = {}
        for run in members:
            key = (run.model, run.method, _row_name(run, members))
            rows.setdefault(key, {})[run.task] = run
        table = Table(family, ["Model / method", *[c[0] for c in columns], "Avg"], [], [])
        for (model, method, name), by_task in rows.items():
            for variant in ("plain", "steered"):
                if variant == "steered" and not any(r.steered for r in by_task.values()):
                    continue
                values = [_value(by_task, task, metric, variant) for _, task, metric in columns]
                known = [v for v in values if v is not None]
                avg = sum(known) / len(known) if known and len(known) == len(values) else None
                label = f"{model} / {method}" + (f" [{name}]" if name else "")
                table.rows.append([label if variant == "plain" else "+ SVDecode", *values, avg])
                table.kinds.append(variant)
        out.append(table)
    return out


def _row_name(run: Run, members: list[Run]) -> str:
    """The run's directory when several runs share model, method and task (e.g. an ablation)."""
    same = [r for r in members if (r.model, r.method, r.task) == (run.model, run.method, run.task)]
    return run.name if len(same) > 1 else ""


def _value(by_task: dict[str, Run], task: str, metric: str, variant: str) -> float | None:
    run = by_task.get(task)
    value = None if run is None else run.metric(metric, variant)
    return None if value is None else 100.0 * value


def _cell(value: Any, plain: Any = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = f"{value:.2f}"
    if plain is not None and not isinstance(plain, str):
        text += f" ({value - plain:+.2f})"
    return text


def _formatted_rows(table: Table) -> list[list[str]]:
    """Cells as text; a steered row shows the change in points against its plain row."""
    rows = []
    for index, (row, kind) in enumerate(zip(table.rows, table.kinds)):
        plain = table.rows[index - 1] if kind == "steered" else [None] * len(row)
        rows.append([_cell(v, p if kind == "steered" else None) for v, p in zip(row, plain)])
    return rows


def write_tables(table: Table, out: Path) -> list[Path]:
    rows = _formatted_rows(table)
    md = out / f"table_{table.family}.md"
    lines = [f"| {' | '.join(table.header)} |", f"|{'|'.join(['---'] * len(table.header))}|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    md.write_text("\n".join(lines) + f"\n\n{NOTE}\n")
    csv_path = out / f"table_{table.family}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(table.header)
        for row in table.rows:
            writer.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row])
    tex = out / f"table_{table.family}.tex"
    escape = lambda text: text.replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")  # noqa: E731
    body = [r"\begin{tabular}{l" + "r" * (len(table.header) - 1) + "}", r"\toprule",
            " & ".join(escape(h) for h in table.header) + r" \\", r"\midrule"]
    body += [" & ".join(escape(c) for c in row) + r" \\" for row in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    tex.write_text("\n".join(body) + "\n")
    return [md, csv_path, tex]


# -- figures --------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=FIGSIZE, dpi=DPI)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


#: how each strength estimate is drawn on the strength curves (the paper's mu* dashed black)
ESTIMATE_STYLES = {"mu_star": ("black", "--"), "mu_star_heldout": ("tab:purple", ":"),
                   "mu_star_filtered": ("tab:brown", "-.")}
#: each mode's curves: static solid, dynamic dashed
MODE_STYLES = {"static": "-", "dynamic": "--"}


def symlog_threshold(strengths: list[float]) -> float:
    """The symlog axis' linear range: the smallest non-zero |mu| shown, so 0.1 and 100 both get room."""
    nonzero = [abs(m) for m in strengths if m]
    return min(nonzero) if nonzero else 1.0


def mu_curve_figure(run: Run, out: Path) -> Path:
    """Each mode's test metrics against mu on a symlog axis (both signs, small and large strengths
    alike), every estimate marked (its mode in the label) and the (mode, mu) steered at as a star."""
    curves = run.results["test_curves"]
    steering = run.results.get("steering") or {}
    plt, fig, ax = _figure()
    strengths = []
    for mode, curve in curves.items():
        order = sorted(range(len(curve["mu"])), key=lambda i: curve["mu"][i])
        mus = [curve["mu"][i] for i in order]
        strengths += mus
        for name, values in curve["metrics"].items():
            if "/" in name or all(v is None for v in values):
                continue
            points = [None if values[i] is None else 100 * values[i] for i in order]
            line = ax.plot(mus, points, MODE_STYLES.get(mode, "-"), marker="o", markersize=3,
                           label=f"{name} ({mode})")[0]
            if steering.get("mode") == mode and steering.get("mu") in curve["mu"]:
                steered = values[curve["mu"].index(steering["mu"])]
                if steered is not None:
                    ax.plot([steering["mu"]], [100 * steered], marker="*", markersize=14, color=line.get_color())
    for mode, estimates in (steering.get("estimates") or {}).items():
        for name, entry in estimates.items():
            if entry.get("mu") is None:
                continue
            color, style = ESTIMATE_STYLES.get(name, ("gray", "--"))
            paper = " (paper)" if name == "mu_star" else ""
            ax.axvline(entry["mu"], color=color, linestyle=style, linewidth=1.2,
                       label=f"{name} {mode} = {entry['mu']:.3g}{paper}")
            strengths.append(entry["mu"])
    ax.set_xscale("symlog", linthresh=symlog_threshold(strengths))
    ax.set_xlabel("steering strength mu (symlog; < 0: away from the pre-trained model)")
    ax.set_ylabel("metric (%)")
    ax.set_title(f"{run.name}: test metrics against mu, both modes (star: steered)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(plt, fig, out / f"mu_curve_{_slug(run.name)}.png")


def warm_start_figure(runs: list[Run], out: Path) -> Path | None:
    """Runs that differ only in their warm-start length: the metric against the steps."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        steps = (run.results.get("steering") or {}).get("warm_start_steps")
        if steps is not None:
            mode = run.results["steering"]["mode"]
            groups[(run.task, run.model, run.method, mode)].append(run)
    groups = {k: v for k, v in groups.items() if len({r.results["steering"]["warm_start_steps"] for r in v}) > 1}
    if not groups:
        return None
    plt, fig, ax = _figure()
    metrics = set()
    for (task, model, method, mode), members in sorted(groups.items()):
        members.sort(key=lambda r: r.results["steering"]["warm_start_steps"])
        steps = [r.results["steering"]["warm_start_steps"] for r in members]
        metric = PRIMARY.get(task, next(iter(members[0].results["metrics"])))
        metrics.add(metric)
        for variant, style in (("plain", "-"), ("steered", "--")):
            values = [r.metric(metric, variant) for r in members]
            ax.plot(steps, [None if v is None else 100 * v for v in values], style, marker="o",
                    label=f"{model} {method} {mode}: {metric} {variant}")
    ax.set_xlabel("warm-start steps")
    ax.set_ylabel(f"{metrics.pop().upper()} (%)" if len(metrics) == 1 else "metric (%)")
    ax.set_title("warm-start length: plain and steered", fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "warm_start_steps.png")


def bars_figure(run: Run, out: Path) -> Path | None:
    """TruthfulQA per-category or commonsense per-set bars, plain and steered."""
    if run.task == "commonsense":
        names = [n.split("/", 1)[1] for n in run.results["metrics"] if n.startswith("accuracy/")]
        values = {v: [run.metric(f"accuracy/{n}", v) for n in names] for v in ("plain", "steered")}
        kind, label = "sets", "accuracy (%)"
    elif run.results.get("per_category"):
        metric = PRIMARY.get(run.task, "mc1")
        names = sorted(run.results["per_category"])
        values = {v: [(run.results["per_category"][n].get(metric) or {}).get(v) for n in names]
                  for v in ("plain", "steered")}
        kind, label = "categories", f"{metric} (%)"
    else:
        return None
    plt, fig, ax = _figure()
    width = 0.4
    for offset, variant in ((-width / 2, "plain"), (width / 2, "steered")):
        heights = [0.0 if v is None else 100 * v for v in values[variant]]
        if any(v is not None for v in values[variant]):
            ax.bar([i + offset for i in range(len(names))], heights, width, label=variant)
    ax.set_xticks(range(len(names)), names, rotation=60 if len(names) > 6 else 0, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(f"{run.name}: {run.task} per {kind[:-1]}, plain and steered", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / f"{kind}_{_slug(run.name)}.png")


def report(runs_dir: str | Path) -> list[Path]:
    """Write the tables and figures of every run under ``runs_dir``; the written paths."""
    runs_dir = Path(runs_dir)
    runs = collect(runs_dir)
    if not runs:
        raise DataFormatError(f"{runs_dir}: no results.json found")
    out = runs_dir / "report"
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written = [p for table in tables(runs) for p in write_tables(table, out)]
    for run in runs:
        if run.results.get("test_curves"):
            written.append(mu_curve_figure(run, figures))
        bars = bars_figure(run, figures)
        if bars is not None:
            written.append(bars)
    steps = warm_start_figure(runs, figures)
    if steps is not None:
        written.append(steps)
    return written
