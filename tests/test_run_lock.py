"""The run lock's decisions, in one process: live holders refuse, gone ones are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sctd_dist import run_lock
from sctd_dist.run_lock import LOCK_FILE, RunLockError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(save, **fields) -> None:
    holder = {"host": "elsewhere", "pid": 1, "process_start": "", "token": "t", "step": 7,
              "started": time.time(), "refreshed": time.time(), **fields}
    save.mkdir(parents=True, exist_ok=True)
    (save / LOCK_FILE).write_text(json.dumps(holder))


def test_live_holder_refuses_and_release_frees(tmp_path):
    first = run_lock.acquire(tmp_path, refresh_s=0.05)
    try:
        with pytest.raises(RunLockError) as err:
            run_lock.acquire(tmp_path)
        message = str(err.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and "--take-over" in message
        first.at_step(3)
        time.sleep(0.3)  # the heartbeat wrote the step
        assert json.loads((tmp_path / LOCK_FILE).read_text())["step"] == 3
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    run_lock.acquire(tmp_path).release()  # free again


@pytest.mark.parametrize("fields, taken, needle", [
    ({"host": None, "pid": None}, True, "is not running"),  # same host, dead process
    ({"host": None, "process_start": "1"}, True, "is not running"),  # same host, pid recycled
    ({"refreshed": time.time() - 3600}, True, "not refreshed for"),  # another host, silent
    ({}, False, "belongs to a running run (elsewhere pid 1, at step 7"),  # another host, fresh
])
def test_gone_holders_are_taken_over(tmp_path, fields, taken, needle):
    import socket

    if fields.get("host", "") is None:
        fields["host"] = socket.gethostname()
    if "pid" in fields and fields["pid"] is None:
        fields["pid"] = _dead_pid()
    elif fields.get("process_start"):
        fields["pid"] = os.getpid()  # alive, but started at another time than recorded
    _plant(tmp_path, **fields)
    if not taken:
        with pytest.raises(RunLockError, match=r"belongs to a running run \(elsewhere pid 1, at step 7"):
            run_lock.acquire(tmp_path)
        lock = run_lock.acquire(tmp_path, take_over=True)  # the plain override
        assert lock.takeover["reason"] == "--take-over"
    else:
        lock = run_lock.acquire(tmp_path)
        assert needle in lock.takeover["reason"] and lock.takeover["previous"]["step"] == 7
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_run_whose_folder_was_taken_stops_refreshing(tmp_path):
    lock = run_lock.acquire(tmp_path, refresh_s=60)
    _plant(tmp_path, token="other")  # a --take-over by another run
    assert not lock.refresh() and "taken over by elsewhere" in lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "other"  # left to its owner


def test_other_ranks_and_no_save_hold_nothing(tmp_path):
    assert not run_lock.for_run(tmp_path, rank=1).held
    assert not run_lock.for_run(None, rank=0).held
    assert not (tmp_path / LOCK_FILE).exists()
