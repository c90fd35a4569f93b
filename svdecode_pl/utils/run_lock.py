"""One writer per run directory: ``<run>/.svdecode.lock``, created atomically by the command that
writes the run (``fit``, ``test``, ``predict``), removed when it ends. A second command into the same
directory is refused in one line; a lock left by a process that no longer runs (killed) on this host
is taken over with a one-line note. Only the first process of a multi-process run takes it (the
others start after it, into the same directory)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from svdecode_pl.utils.errors import UserInputError

LOCK_FILE = ".svdecode.lock"
#: the environment variables that give a process's rank under the launchers we support
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunLockedError(UserInputError):
    """Another command is writing the run directory."""


def first_process() -> bool:
    """Whether this process is rank 0 of its run (or the only one)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run directory; :meth:`acquire` then :meth:`release`."""

    def __init__(self, directory: str | os.PathLike, command: str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.command = command
        self.held = False

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("SLURM_JOB_ID")})

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                with open(self.path, "x", encoding="utf-8") as handle:
                    handle.write(self._record() + "\n")
                self.held = True
                return
            except FileExistsError:
                self._take_over_if_stale()
        raise RunLockedError(f"{self.path.parent}: another svdecode command started writing this run directory "
                             f"just now; use another --trainer.default_root_dir")

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        pid, host = holder.get("pid"), holder.get("host")
        here = host == socket.gethostname()
        dead = isinstance(pid, int) and here and pid != os.getpid() and not _alive(pid)
        # a SLURM job requeued (maybe onto another node) replaces its own killed incarnation
        requeued = holder.get("job") is not None and holder.get("job") == os.environ.get("SLURM_JOB_ID")
        if dead or (requeued and pid != os.getpid()):
            print(f"svdecode: note: {self.path}: the lock of pid {pid} ({holder.get('command', '?')}, "
                  f"since {holder.get('started', '?')}), which no longer runs, is taken over", file=sys.stderr,
                  flush=True)
            self.path.unlink(missing_ok=True)
            return
        who = f"pid {pid} on {host}" if pid else "a process"
        raise RunLockedError(
            f"{self.path.parent}: svdecode {holder.get('command', '?')} ({who}, since {holder.get('started', '?')}) "
            f"is writing this run directory; wait for it to end or use another --trainer.default_root_dir "
            f"(if it no longer runs: delete {self.path})")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)


_HELD: list[RunLock] = []


def lock_run_directory(directory: str | os.PathLike, command: str) -> None:
    """Take the run directory's lock for the rest of this command (first process only)."""
    if not first_process():
        return
    lock = RunLock(directory, command)
    lock.acquire()
    _HELD.append(lock)


def release_run_locks() -> None:
    """Release every lock this process took (the command's end, however it ends)."""
    while _HELD:
        _HELD.pop().release()
