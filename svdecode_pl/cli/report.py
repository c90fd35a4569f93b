"""``svdecode report RUNS_DIR``: the arguments of :func:`svdecode_pl.results.report.report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdecode_pl.results import report as report_module
from svdecode_pl.results.report import report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="svdecode report", description=report_module.__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a directory with results.json files below it")
    args = parser.parse_args(argv)
    written = report(args.runs_dir)
    for table in sorted(p for p in written if p.suffix == ".md"):
        print(table.read_text())
    print(f"report: {len(written)} files in {Path(args.runs_dir) / 'report'}")
