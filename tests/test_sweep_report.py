"""``svdecode sweep`` and ``svdecode report``: a 2 x 2 grid on the tiny model, its tables checked
cell by cell against each run's results.json, its figures decoded; a second sweep runs nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from svdecode_pl.cli.entry import run_cli
from svdecode_pl.cli.sweep import load_spec
from svdecode_pl.models.peft_methods import method_name
from svdecode_pl.results.report import DPI, FIGSIZE
from svdecode_pl.utils.errors import DataFormatError

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"""
runs_dir: {tmp_path / "runs"}
base: [{ROOT / "configs" / "quickstart.yaml"}]
args: [--data.synthetic_questions, "20", --data.eval_batch_size, "5", --trainer.max_steps, "3",
       --trainer.enable_progress_bar, "false", --trainer.enable_model_summary, "false",
       --steering.mu_grid, "[0.0, 1.0, 4.0]", --steering.mu_grid_relative, "true",
       --model.name_or_path, svdecode-tiny]
axes:
  peft:
    lora: []
    ia3: [{ROOT / "configs" / "peft" / "ia3.yaml"}]
  steering:
    static: [--steering.mode, static]
    dynamic: {ROOT / "configs" / "ablations" / "dynamic.yaml"}
stages: [fit, test]
""")
    return spec


def test_spec_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs_dir: x\nstages: [fit, tune]\n")
    with pytest.raises(DataFormatError, match="bad.yaml: field 'stages': unknown stage"):
        load_spec(bad)
    bad.write_text("axes: {}\n")
    with pytest.raises(DataFormatError, match="field 'runs_dir': missing"):
        load_spec(bad)
    assert [p.name for p in load_spec(write_spec(tmp_path)).points()] == [
        "peft=lora,steering=static", "peft=lora,steering=dynamic", "peft=ia3,steering=static",
        "peft=ia3,steering=dynamic"]


@pytest.mark.slow
def test_sweep_then_report(tmp_path, capsys):
    spec = write_spec(tmp_path)
    run_cli(["sweep", str(spec)])
    runs = tmp_path / "runs"
    results = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/results.json")}
    assert len(results) == 4
    assert {r["steering"]["mode"] for r in results.values()} == {"static", "dynamic"}
    assert {r["model"]["peft"] for r in results.values()} == {"LoraConfig", "IA3Config"}

    run_cli(["report", str(runs)])
    with (runs / "report" / "table_truthfulqa.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Model / method", "MC1", "MC2", "MC3", "Avg"]
    body = rows[1:]
    assert len(body) == 8  # each run: its plain row, then its "+ SVDecode" row
    for plain, steered in zip(body[::2], body[1::2]):
        assert steered[0] == "+ SVDecode"
        name = plain[0].split("[")[1].rstrip("]")
        run = results[name]
        assert plain[0].startswith(f"svdecode-tiny / {method_name(run['model']['peft'])}")
        for column, metric in zip(plain[1:4], ("mc1", "mc2", "mc3")):
            assert float(column) == pytest.approx(100 * run["metrics"][metric]["plain"], abs=1e-4)
        for column, metric in zip(steered[1:4], ("mc1", "mc2", "mc3")):
            assert float(column) == pytest.approx(100 * run["metrics"][metric]["steered"], abs=1e-4)
        avg = sum(100 * run["metrics"][m]["plain"] for m in ("mc1", "mc2", "mc3")) / 3
        assert float(plain[4]) == pytest.approx(avg, abs=1e-4)
    markdown = (runs / "report" / "table_truthfulqa.md").read_text()
    assert "+ SVDecode" in markdown and "near zero" in markdown
    assert r"\toprule" in (runs / "report" / "table_truthfulqa.tex").read_text()
    figures = sorted((runs / "report" / "figures").glob("*.png"))
    assert len([f for f in figures if f.name.startswith("mu_curve_")]) == 4
    for figure in figures:
        with Image.open(figure) as image:
            image.load()
            assert image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))

    logs = {p: p.stat().st_mtime for p in runs.glob("*/*.log")}
    capsys.readouterr()
    run_cli(["sweep", str(spec)])
    assert "0 point(s) run, 4 skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in runs.glob("*/*.log")} == logs


def test_report_and_sweep_start_without_lightning():
    """``svdecode report`` / ``sweep`` read files and write tables: they do not pay Lightning's
    start-up (~6 s here); the entry point imports it only for fit/validate/test/predict."""
    import subprocess
    import sys

    code = (
        "import sys, svdecode_pl.cli, svdecode_pl.results.report, svdecode_pl.cli.sweep, svdecode_pl.tasks.readers\n"
        "heavy = sorted(m for m in ('lightning', 'torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from svdecode_pl.data import TruthfulQADataModule\n"  # the data modules still import on first use
        "assert 'lightning' in sys.modules and TruthfulQADataModule.task_name == 'truthfulqa_mc'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
