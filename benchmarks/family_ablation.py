"""The default on the family of miniatures (README, "The default on the family"): for each member,
warm-start length and seed, one ``svdecode fit`` + ``svdecode test`` with the MC quickstart and the
default strength rule (``benchmarks/miniature_ablation.py``'s cells, reused when present), then one
table of test MC1/MC2 for plain, the default, the oracle (the best fixed (mode, mu) of the test
curves: an upper bound no rule can use) and the paper's mu* in each mode; how many seeds the
default made significantly worse or better than plain (paired 95% interval of any metric wholly
below / of MC1 or MC2 wholly above 0); and, where the oracle gains >= 3 MC1 points, the share of the
oracle's MC1 gain the default captured (sum of the default's gains over the oracle's, those seeds).

The split: the quickstart's 200 warm-start questions, and ``--validation-questions`` (300) each for
validation and test (the quickstart has 100 and 200). At 100, a validation gain near 3 points is not
significant in the guard's simultaneous band, and the default missed the oracle's 80-step gains on
svdecode-mini and svdecode-mini-sports (README, "The default on the family").

The members are run in the order given; the held-out member (svdecode_pl/models/family.py) goes
last and is run once, with the rule and the split fixed on the tuning members.

    python benchmarks/family_ablation.py --out runs/family_ablation --figure docs/family_ablation.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import miniature_ablation as cells_of  # noqa: E402  (the per-member runner beside this file)

from svdecode_pl.models.family import FAMILY  # noqa: E402

ROWS = ("plain", "choice", "oracle", "mu_star (static)", "mu_star (dynamic)")
#: the oracle's MC1 gain (points) from which the captured share is reported (issue 26)
ORACLE_GAIN = 3.0
#: the quickstart's warm-start split, the same in every cell
WARM_START_QUESTIONS = 200
LABELS = {"choice": "default (validation rule)"}
HEADERS = {"choice": "default", "mu_star (static)": "mu* static", "mu_star (dynamic)": "mu* dynamic"}


def split_options(validation_questions: int) -> tuple[str, ...]:
    """The data options for 200 warm-start questions and ``validation_questions`` each for validation
    and test (exact fractions of the generated set)."""
    total = WARM_START_QUESTIONS + 2 * validation_questions
    return ("--data.init_args.synthetic_questions", str(total), "--data.init_args.train_fraction",
            repr(WARM_START_QUESTIONS / total), "--data.init_args.val_fraction", repr(validation_questions / total))


def positive_count(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 validation questions would leave nothing to choose on)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def significance(result: dict) -> tuple[bool, bool]:
    """(worse, better): some metric's paired interval wholly below 0; MC1's or MC2's wholly above."""
    difference = result["test_difference"]
    worse = any(entry["high"] < 0 for entry in difference.values())
    better = any(difference[m]["low"] > 0 for m in ("mc1", "mc2") if m in difference)
    return worse, better


def captured(runs: list[dict]) -> str:
    """The default's share of the oracle's MC1 gain, over the seeds where the oracle gains >= 3."""
    gains = [(v["choice"]["mc1"] - v["plain"]["mc1"], v["oracle"]["mc1"] - v["plain"]["mc1"])
             for v in map(cells_of.cell_values, runs) if v["oracle"]["mc1"] is not None]
    big = [(default, best) for default, best in gains if best >= ORACLE_GAIN]
    if not big:
        return "oracle < 3"
    return f"{100 * sum(d for d, _ in big) / sum(b for _, b in big):.0f}% ({len(big)} seeds)"


def row(member: str, role: str, steps: int, runs: list[dict]) -> str:
    """One table line: per metric, each strength's mean ± sd over the seeds; the guard's outcome."""
    values = [cells_of.cell_values(r) for r in runs]
    cells = [cells_of.spread([v[name][metric] for v in values]) for metric in ("mc1", "mc2") for name in ROWS]
    flags = [significance(r) for r in runs]
    chosen = ", ".join(f"{r['steering']['mode']} {r['steering']['mu']:g}" for r in runs)
    return (f"| {member} ({role}) | {steps} | " + " | ".join(cells)
            + f" | {sum(w for w, _ in flags)} / {sum(b for _, b in flags)} | {captured(runs)} | {chosen} |")


def table(results: dict[tuple[str, int], list[dict]]) -> str:
    names = " | ".join(f"{metric} {HEADERS.get(name, name)}" for metric in ("MC1", "MC2") for name in ROWS)
    lines = [f"| member | steps | {names} | seeds worse / better | oracle MC1 gain captured | default (mode, mu) |",
             "|---|---|" + "---|" * (2 * len(ROWS)) + "---|---|---|"]
    roles = {name: member.role for name, member in FAMILY.items()}
    lines += [row(member, roles[member], steps, runs) for (member, steps), runs in results.items()]
    return "\n".join(lines)


def figure(results: dict[tuple[str, int], list[dict]], path: Path) -> None:
    """MC1 gain over plain (mean, sd over seeds) of the default, the oracle and mu*, per member."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members = list(dict.fromkeys(member for member, _ in results))
    fig, axes = plt.subplots(1, len(members), figsize=(4.6 * len(members), 3.6), squeeze=False, sharey=True)
    for ax, member in zip(axes[0], members):
        lengths = sorted(steps for m, steps in results if m == member)
        for name in ROWS[1:]:
            gains = [[v[name]["mc1"] - v["plain"]["mc1"] for v in map(cells_of.cell_values, results[(member, s)])]
                     for s in lengths]
            ax.errorbar(lengths, [statistics.mean(g) for g in gains], marker="o", capsize=3,
                        label=LABELS.get(name, name), yerr=[statistics.stdev(g) if len(g) > 1 else 0.0 for g in gains])
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lengths, [str(s) for s in lengths])
        ax.set_title(f"{member} ({FAMILY[member].role})", fontsize=9)
        ax.set_xlabel("warm-start steps")
    axes[0][0].set_ylabel("test MC1 steered - plain (points)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "family_ablation")
    parser.add_argument("--members", nargs="+", default=list(FAMILY))
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 80])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--validation-questions", type=positive_count, default=300)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    split = split_options(args.validation_questions)
    results: dict[tuple[str, int], list[dict]] = {}
    for member in args.members:
        for steps in args.steps:
            results[(member, steps)] = [cells_of.run_cell(args.out / member, steps, seed, "chosen", member, split)
                                        for seed in args.seeds]
            print(f"done: {member}, {steps} steps", flush=True)
        (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    figure(results, args.figure or args.out / "family_ablation.png")


if __name__ == "__main__":
    main()
