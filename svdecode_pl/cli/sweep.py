"""``svdecode sweep SPEC``: a grid of base configs x fragments x overrides, one run directory per point.

A sweep spec is a YAML file::

    runs_dir: runs/sweeps/peft_x_mode          # one directory per point below it
    base: [configs/quickstart.yaml]            # configs every point starts from
    args: [--trainer.max_steps, "30"]          # command-line options of every point
    axes:                                      # the grid: every combination of one value per axis
      peft:                                    # value name -> config file(s) and/or options
        lora: configs/peft/lora.yaml
        ia3: configs/peft/ia3.yaml
      steering:
        static: []
        dynamic: configs/ablations/dynamic.yaml
    stages: [fit, test]                        # what each point runs

Point ``peft=ia3,steering=dynamic`` runs ``svdecode fit`` then ``svdecode test`` (with the
adapter it wrote) in ``runs_dir/peft=ia3,steering=dynamic``. A point whose ``results.json``
exists is skipped, and a fit with a ``last.ckpt`` resumes from it, so a preempted sweep resumes
by running the same command again. ``--slurm`` submits the points as a SLURM job array
(``slurm/sweep_point.sbatch``), one point per array task; ``--index I`` runs point I only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from svdecode_pl.cli.checks import load_yaml_strictly
from svdecode_pl.utils.errors import DataFormatError

STAGES = ("fit", "test", "predict")


@dataclass
class SweepPoint:
    """One run of the grid: its name (and directory), configs and options."""

    name: str
    settings: dict[str, str]
    configs: list[str]
    args: list[str]

    def run_dir(self, runs_dir: Path) -> Path:
        return runs_dir / self.name


@dataclass
class SweepSpec:
    runs_dir: Path
    base: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    axes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    stages: list[str] = field(default_factory=lambda: ["fit", "test"])

    def points(self) -> list[SweepPoint]:
        names = list(self.axes)
        points = []
        for values in itertools.product(*(list(self.axes[name].items()) for name in names)):
            settings = {axis: value for axis, (value, _) in zip(names, values)}
            configs, args = list(self.base), list(self.args)
            for _, parts in values:
                configs += [p for p in parts if p.endswith((".yaml", ".yml"))]
                args += [p for p in parts if not p.endswith((".yaml", ".yml"))]
            name = ",".join(f"{axis}={value}" for axis, value in settings.items()) or "base"
            points.append(SweepPoint(name, settings, configs, args))
        return points


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise DataFormatError(f"{where}: expected a config path, an option list or a list of both")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        raw = load_yaml_strictly(path.read_text(encoding="utf-8"), str(path))  # a key given twice: one line
    except yaml.YAMLError as err:
        raise DataFormatError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or "runs_dir" not in raw:
        raise DataFormatError(f"{path}: field 'runs_dir': missing")
    unknown = set(raw) - {"runs_dir", "base", "args", "axes", "stages"}
    if unknown:
        raise DataFormatError(f"{path}: unknown field(s) {sorted(unknown)}")
    axes = {}
    for axis, values in (raw.get("axes") or {}).items():
        if not isinstance(values, dict) or not values:
            raise DataFormatError(f"{path}: field 'axes.{axis}': expected a mapping of value names to configs/options")
        axes[str(axis)] = {str(name): _as_list(parts, f"{path}: field 'axes.{axis}.{name}'")
                           for name, parts in values.items()}
    stages = _as_list(raw.get("stages", ["fit", "test"]), f"{path}: field 'stages'")
    if bad := [s for s in stages if s not in STAGES]:
        raise DataFormatError(f"{path}: field 'stages': unknown stage(s) {bad} (expected {list(STAGES)})")
    return SweepSpec(Path(raw["runs_dir"]), _as_list(raw.get("base"), f"{path}: field 'base'"),
                     _as_list(raw.get("args"), f"{path}: field 'args'"), axes, stages)


def stage_command(point: SweepPoint, stage: str, run_dir: Path, executable: list[str]) -> list[str]:
    """The ``svdecode`` command of one stage of a point."""
    command = [*executable, stage, *[a for c in point.configs for a in ("--config", c)], *point.args,
               "--trainer.default_root_dir", str(run_dir)]
    if stage == "fit":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():  # a preempted point resumes where it stopped
            command += ["--ckpt_path", str(last)]
    elif (run_dir / "adapter").exists():
        command += ["--model.adapter_path", str(run_dir / "adapter")]
    if stage == "predict":
        command += ["--trainer.callbacks+=svdecode_pl.callbacks.JSONLPredictionWriter"]
    return command


def fit_finished(run_dir: Path) -> bool:
    """A point's fit wrote its run (the vector is the fit end's last file; without steering, the adapter
    and no checkpoint to continue): a second fit into the directory is refused, so it is skipped."""
    vector = (run_dir / "steering" / "steering_vector.json").is_file()
    adapter = (run_dir / "adapter" / "adapter_config.json").is_file()
    return vector or (adapter and not (run_dir / "checkpoints" / "last.ckpt").is_file())


def run_point(spec: SweepSpec, point: SweepPoint, executable: list[str]) -> bool:
    """Run a point's stages unless its results exist; True if it ran."""
    run_dir = point.run_dir(spec.runs_dir)
    if (run_dir / "results.json").exists():
        print(f"sweep: {point.name}: done already, skipped", flush=True)
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in spec.stages:
        if stage == "fit" and fit_finished(run_dir):
            print(f"sweep: {point.name}: fit done already (adapter and vector written), skipped", flush=True)
            continue
        command = stage_command(point, stage, run_dir, executable)
        print(f"sweep: {point.name}: {shlex.join(command[len(executable):])}", flush=True)
        with (run_dir / f"{stage}.log").open("a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"svdecode: error: sweep point {point.name}: {stage} failed "
                             f"(exit {done.returncode}); see {run_dir / f'{stage}.log'}")
    return True


def submit_slurm(spec_path: Path, n_points: int, sbatch_args: list[str]) -> None:
    """One SLURM job array task per point (``slurm/sweep_point.sbatch``)."""
    script = Path(__file__).resolve().parents[1] / "slurm" / "sweep_point.sbatch"
    command = ["sbatch", f"--array=0-{n_points - 1}", *sbatch_args, str(script)]
    env = dict(os.environ, SWEEP_SPEC=str(spec_path.resolve()))
    print(f"sweep: {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, env=env)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="svdecode sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the sweep spec (YAML)")
    parser.add_argument("--index", type=int, help="run point INDEX only (a SLURM array task)")
    parser.add_argument("--slurm", action="store_true", help="submit the points as a SLURM job array")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options, e.g. '--partition=gpu'")
    parser.add_argument("--list", action="store_true", help="print the points and exit")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    points = spec.points()
    if args.list:
        for index, point in enumerate(points):
            print(index, point.name)
        return
    if args.slurm:
        submit_slurm(Path(args.spec), len(points), shlex.split(args.sbatch_args))
        return
    executable = [sys.executable, "-m", "svdecode_pl.cli"]
    if args.index is not None:
        if not 0 <= args.index < len(points):
            raise DataFormatError(f"--index {args.index}: the sweep has {len(points)} points")
        points = [points[args.index]]
    ran = sum(run_point(spec, point, executable) for point in points)
    print(f"sweep: {ran} point(s) run, {len(points) - ran} skipped; runs in {spec.runs_dir}", flush=True)
