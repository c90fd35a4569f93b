"""Choosing a generation task's strength: one log-likelihood pass over the reference answers
(``--data.selection references``, the default) against one decoding pass per candidate
(``--data.selection decoding``), on the miniature.

    python benchmarks/generation_selection.py [--out runs/generation_selection] [--seeds 0 1 2 3 4]
        [--steps 20 5 80] [--repeat 2]

For each warm-start length and seed: ``svdecode fit`` with configs/truthfulqa_gen/quickstart.yaml
(svdecode-mini, 50 validation questions, the two-sided grid in both modes: 38 candidates), then
from that adapter, extraction only (``--trainer.max_steps 0``) under each selection, alternating,
``--repeat`` times. Reported per cell: the validation pass's seconds under each (the fastest of the
repeats; ``validation_seconds`` of the vector's extraction record: the pass alone, with the
references' one decoding check of the chosen candidate when the guard passed; the calibration
passes are the same for both), and the (mode, mu) each chose (mu 0: the guard steered off), and the
decoded validation gain at the candidate the references rank best (read off the decoding run).
Summary: the median time of each and their ratio, how often the two chose the same (mode, mu), and
how often both steered (or both did not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from svdecode_pl.steering.strength import Candidate, best_index

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "truthfulqa_gen" / "quickstart.yaml"
SELECTIONS = ("references", "decoding")


def svdecode(*args: str) -> None:
    """One ``svdecode`` process (its own interpreter: nothing cached between runs)."""
    subprocess.run([sys.executable, "-m", "svdecode_pl.cli", *args], check=True, capture_output=True)


def common(run_dir: Path, seed: int, steps: int) -> list[str]:
    return ["--config", str(CONFIG), "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps), "--trainer.callbacks", "[]"]


def choose(run_dir: Path, adapter: Path, seed: int, selection: str) -> dict:
    """Extraction only from ``adapter`` under ``selection``: the choice and the validation pass's seconds."""
    svdecode("fit", *common(run_dir, seed, 0), "--model.adapter_path", str(adapter), "--data.selection", selection)
    meta = json.loads((run_dir / "steering" / "steering_vector.json").read_text())
    choice = meta["strength_choice"]
    curves = choice["validation_curves"]
    candidates = [Candidate(mode, mu) for mode, curve in curves.items() for mu in curve["mu"]]
    best = candidates[best_index(candidates, [g for curve in curves.values() for g in curve["gain"]])]
    return {"mode": choice["mode"], "mu": choice["mu"], "seconds": meta["metadata"]["extraction"]["validation_seconds"],
            "best": [best.mode, best.mu], "reason": choice["reason"], "curves": curves}


def cell(out: Path, steps: int, seed: int, repeat: int, redo: tuple[str, ...] = ()) -> dict[str, dict]:
    """One warm-start, then both selections from it; reused when its summary exists (``redo``: these
    selections run again from the same adapter, e.g. after a change to one of them)."""
    done = out / f"steps{steps}_seed{seed}.json"
    warm = out / f"steps{steps}_seed{seed}"
    results: dict[str, dict] = json.loads(done.read_text()) if done.exists() else {}
    if results and not redo:
        return results
    if not results:
        svdecode("fit", *common(warm, seed, steps))
    for selection in redo:
        results.pop(selection, None)
    for _ in range(repeat):
        for selection in [s for s in SELECTIONS if s in redo or not done.exists()]:
            found = choose(out / f"steps{steps}_seed{seed}_{selection}", warm / "adapter", seed, selection)
            if selection in results:
                assert (found["mode"], found["mu"]) == (results[selection]["mode"], results[selection]["mu"])
                found["seconds"] = min(found["seconds"], results[selection]["seconds"])
            results[selection] = found
    done.write_text(json.dumps(results, indent=1) + "\n")
    return results


def decoded_gain(found: dict[str, dict]) -> float:
    """The decoding selection's validation gain (points of mean(BLEU acc, ROUGE-L acc)) at the
    candidate the references rank best: what the cheap choice's best would do to decoded text."""
    mode, mu = found["references"]["best"]
    curve = found["decoding"]["curves"][mode]
    return 100 * curve["gain"][curve["mu"].index(mu)]


def summary(cells: dict[tuple[int, int], dict[str, dict]]) -> str:
    lines = ["| steps | seed | references: steered at (best before the guard), s | decoding: the same | same | "
             "decoded gain at the references' best |", "|---|---|---|---|---|---|"]
    for (steps, seed), found in cells.items():
        ref, dec = found["references"], found["decoding"]
        same = (ref["mode"], ref["mu"]) == (dec["mode"], dec["mu"])
        lines.append(f"| {steps} | {seed} | {ref['mode']} {ref['mu']:g} ({ref['best'][0]} {ref['best'][1]:g}), "
                     f"{ref['seconds']:.1f} | {dec['mode']} {dec['mu']:g} ({dec['best'][0]} {dec['best'][1]:g}), "
                     f"{dec['seconds']:.1f} | {'yes' if same else 'no'} | {decoded_gain(found):+.1f} |")
    ref_s = statistics.median(c["references"]["seconds"] for c in cells.values())
    dec_s = statistics.median(c["decoding"]["seconds"] for c in cells.values())
    same = sum((c["references"]["mode"], c["references"]["mu"]) == (c["decoding"]["mode"], c["decoding"]["mu"])
               for c in cells.values())
    steered = sum((c["references"]["mu"] != 0.0) == (c["decoding"]["mu"] != 0.0) for c in cells.values())
    best = sum(c["references"]["best"] == c["decoding"]["best"] for c in cells.values())
    modes = sum(c["references"]["best"][0] == c["decoding"]["best"][0] for c in cells.values())
    lines += ["", f"validation pass, median: references {ref_s:.1f} s, decoding {dec_s:.1f} s "
                  f"({dec_s / ref_s:.0f}x); same (mode, mu) in {same} of {len(cells)} cells; "
                  f"both steered or both off in {steered} of {len(cells)}; the same best candidate before the guard "
                  f"in {best} of {len(cells)} (the same mode in {modes})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "generation_selection")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--redo", nargs="*", default=[], choices=SELECTIONS,
                        help="run these selections again in cells already measured")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cells = {}
    for steps in args.steps:
        for seed in args.seeds:
            cells[(steps, seed)] = cell(args.out, steps, seed, args.repeat, tuple(args.redo))
            print(f"done: {steps} steps, seed {seed}", flush=True)
    text = summary(cells)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
