"""The device check's own machinery (benchmarks/device_check.py), which must not lose a GPU lease:
a step past its time is killed with its children, a step with no time left is skipped, and the
summary on disk holds every step recorded so far."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
device_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_check)


def test_a_step_past_its_time_is_killed_with_its_children(tmp_path):
    child = tmp_path / "child.pid"
    sleeper = ("import os, subprocess, sys, time; "
               f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.perf_counter()
    step = device_check.run_step("sleep", [[sys.executable, "-c", sleeper]], dict(os.environ), timeout=3)
    assert step["rc"] == 124 and "timed out" in step["output_tail"]
    assert time.perf_counter() - start < 15
    pid = int(child.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_later_commands_of_a_failed_step_do_not_run(tmp_path):
    marker = tmp_path / "ran"
    commands = [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]]
    step = device_check.run_step("two", commands, dict(os.environ), timeout=30)
    assert step["rc"] == 3 and not marker.exists()


def test_summary_holds_every_step_recorded_so_far(tmp_path):
    summary = device_check.Summary(tmp_path / "out" / "device_check.json", {"dry_run": True})
    summary.record("wheels", {"missing": []}, 1.0)
    first = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert list(first["steps"]) == ["wheels"] and first["failed"] == []
    summary.record("fit_zero2", {"rc": 124, "seconds": 150.0}, 160.0)
    second = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert list(second["steps"]) == ["wheels", "fit_zero2"] and second["failed"] == ["fit_zero2"]
    assert second["elapsed_seconds"] == 160.0 and not list((tmp_path / "out").glob("*.tmp"))


def test_wheel_versions_are_read_from_file_names():
    assert device_check._installed("torch-0.0.1-py3-none-any.whl") is False
    import torch

    version = torch.__version__
    assert device_check._installed(f"torch-{version}-cp311-cp311-linux_x86_64.whl") is True
