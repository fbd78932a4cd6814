"""One run per checkpoint folder: the lock that rank 0 of a run holds in `--save`.

`--save/run.lock` names the holder (host, pid, the process's start time, SLURM job id and
restart count, the step) and is rewritten by a heartbeat thread every few seconds. A second run on
the same folder stops before any work with one line naming the holder, unless the holder is gone:

- on the same host, its process no longer exists (a SIGKILL, a crash, a node reboot); the
  process start time guards against a recycled pid;
- on another host, the lock has not been refreshed for longer than `--lock-stale-after` seconds
  (a lost node: its pid cannot be checked from here).

A gone holder is taken over (one line on stderr and a `run_lock_takeover` event), so a requeued or
restarted job never needs a hand; `--take-over` takes the folder even from a live holder (which must
then be stopped: two runs writing one folder overwrite each other's checkpoints). Judging and
taking happen under an fcntl lock on `run.lock.guard`, so two runs starting at once cannot both
win. The lock is released at exit; after a SIGKILL it stays, and the next run takes it over.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sctd_dist.checkpoint import check_writable
from sctd_dist.coordination import atomic_write

LOCK_FILE = "run.lock"
GUARD_FILE = "run.lock.guard"
DEFAULT_STALE_AFTER_S = 600.0  # a lost node's lock is taken over after this long without a refresh


class RunLockError(ValueError):
    """The folder belongs to another live run (a user's mistake: one line, no traceback)."""


@dataclass
class Holder:
    """Who holds a run lock, as written in the file."""

    host: str
    pid: int
    process_start: str  # /proc/<pid>/stat start time ("" where unknown): tells a recycled pid apart
    token: str  # unique per run: a refresh checks it still owns the file
    slurm_job_id: str = ""
    slurm_restart_count: str = ""
    step: int | None = None
    started: float = 0.0
    refreshed: float = 0.0

    @staticmethod
    def me() -> Holder:
        """This process."""
        now = time.time()
        return Holder(host=socket.gethostname(), pid=os.getpid(), process_start=_process_start(os.getpid()),
                      token=uuid.uuid4().hex, slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
                      slurm_restart_count=os.environ.get("SLURM_RESTART_COUNT", ""), started=now,
                      refreshed=now)

    def describe(self) -> str:
        """`host pid N (SLURM job J), step S, refreshed T s ago`."""
        job = f" (SLURM job {self.slurm_job_id})" if self.slurm_job_id else ""
        step = "not training yet" if self.step is None else f"at step {self.step}"
        return f"{self.host} pid {self.pid}{job}, {step}, refreshed {time.time() - self.refreshed:.0f} s ago"


def _process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" when unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime (after the command name)


def alive_here(holder: Holder) -> bool:
    """Whether `holder`'s process (on this host) still runs."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    start = _process_start(holder.pid)
    return not (start and holder.process_start and start != holder.process_start)


def gone_reason(holder: Holder, stale_after_s: float) -> str | None:
    """Why `holder` no longer runs, or None when it may still run."""
    if holder.host == socket.gethostname():
        return None if alive_here(holder) else f"process {holder.pid} on {holder.host} is not running"
    age = time.time() - holder.refreshed
    if age > stale_after_s:
        return f"not refreshed for {age:.0f} s (--lock-stale-after {stale_after_s:g})"
    return None


def read_holder(save_dir: Path) -> Holder | None:
    """The holder named in `save_dir`'s lock, or None when there is no lock. A lock that cannot
    be read (a write cut short by a crash) counts as a holder that is gone."""
    path = Path(save_dir) / LOCK_FILE
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return Holder(host="?", pid=-1, process_start="", token="unreadable")


class RunLock:
    """The lock of one run on rank 0 (`held` False on the other ranks and without --save)."""

    def __init__(self, save_dir: Path | None = None, holder: Holder | None = None,
                 refresh_s: float = 10.0) -> None:
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.holder = holder
        self.refresh_s = refresh_s
        self.takeover: dict[str, Any] | None = None  # the previous holder, when taken over
        self.lost: str | None = None  # set when another run took the folder from this one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.holder is not None

    @property
    def path(self) -> Path:
        assert self.save_dir is not None
        return self.save_dir / LOCK_FILE

    def at_step(self, step: int) -> None:
        """The run is at optimizer step `step`; the next refresh writes it."""
        if self.holder is not None:
            self.holder.step = step

    def _write(self) -> None:
        assert self.holder is not None
        self.holder.refreshed = time.time()
        atomic_write(self.path, json.dumps(asdict(self.holder), indent=2))

    def refresh(self) -> bool:
        """Rewrite the lock with the current step and time; False (and `lost` set) when another
        run has taken the folder."""
        if self.holder is None or self.lost:
            return False
        with _guard(self.save_dir):
            current = read_holder(self.save_dir)
            if current is not None and current.token == self.holder.token:
                self._write()
                return True
        self.lost = "its lock was removed" if current is None else f"taken over by {current.describe()}"
        print(f"warning: --save {self.save_dir}: this run no longer owns the folder ({self.lost})",
              file=sys.stderr, flush=True)
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except OSError as exc:  # a full or flaky disk: keep training, try again next beat
                print(f"warning: could not refresh {self.path}: {exc}", file=sys.stderr, flush=True)

    def start_heartbeat(self) -> None:
        """Refresh the lock every `refresh_s` seconds from a daemon thread until released."""
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still this run's (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder is None or self.lost:
            return
        with _guard(self.save_dir):
            current = read_holder(self.save_dir)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)
        self.holder = None


class _guard:
    """An exclusive fcntl lock on `save_dir/run.lock.guard` (released by the kernel on death)."""

    def __init__(self, save_dir: Path) -> None:
        self.path = Path(save_dir) / GUARD_FILE

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def acquire(save_dir: Path, *, take_over: bool = False, stale_after_s: float = DEFAULT_STALE_AFTER_S,
            refresh_s: float | None = None) -> RunLock:
    """Take `save_dir`'s run lock for this process, or raise RunLockError naming the live holder.

    A gone holder (see the module docstring), or any holder with `take_over`, is replaced and
    recorded in `RunLock.takeover`; the heartbeat starts and an atexit hook releases the lock."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    me = Holder.me()
    lock = RunLock(save_dir, me, refresh_s or max(1.0, min(30.0, stale_after_s / 10)))
    with _guard(save_dir):
        previous = read_holder(save_dir)
        if previous is not None:
            reason = gone_reason(previous, stale_after_s) or ("--take-over" if take_over else None)
            if reason is None:
                raise RunLockError(
                    f"--save {save_dir} belongs to a running run ({previous.describe()}); wait for it "
                    f"to end, point --save at another folder, or pass --take-over once it is stopped")
            lock.takeover = {"previous": asdict(previous), "reason": reason}
            print(f"--save {save_dir}: taking over the run lock of {previous.describe()}: {reason}",
                  file=sys.stderr, flush=True)
        lock._write()
    lock.start_heartbeat()
    atexit.register(lock.release)
    return lock


def for_run(save_dir: Path | None, rank: int, *, take_over: bool = False,
            stale_after_s: float = DEFAULT_STALE_AFTER_S) -> RunLock:
    """The run lock of a training run: taken by rank 0 when there is a --save folder; an empty
    lock (nothing held) on the other ranks and without --save."""
    if rank != 0 or save_dir is None:
        return RunLock()
    check_writable(Path(save_dir))  # a file or a read-only folder: its own one-line error first
    return acquire(save_dir, take_over=take_over, stale_after_s=stale_after_s)
