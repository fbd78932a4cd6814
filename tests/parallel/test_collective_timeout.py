"""--dist-timeout: a rank that stops responding (SIGSTOP) makes the others stop within the timeout,
with one line naming the step and the collective. The real entry point under torchrun, 2 gloo
ranks, the tiny model."""

from __future__ import annotations

import re
import signal
import time

import psutil

from sctd_dist.parallel import collective_timeout
from tests.conftest import SEQ
from tests.training import launch

TIMEOUT_S = 30


def _rank_process(proc, rank: int) -> psutil.Process:
    for p in launch._workers(proc):
        try:
            if "train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no worker of rank {rank}")


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path, data_dir):
    args = ["--data-path", str(data_dir), "--seq-length", str(SEQ), "--train-iters", "100000",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-iters", "0",
            "--log-dir", str(tmp_path / "logs"), "--no-progress", "--dist-timeout", str(TIMEOUT_S)]
    proc = launch.start(2, *args)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    launch.wait_for(lambda: metrics.is_file() and metrics.read_text().count('"loss"') >= 3, proc)
    stopped = _rank_process(proc, 1)
    stopped.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S + 150)
    finally:
        if stopped.is_running():
            stopped.kill()
        launch.kill(proc)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, out[-4000:]
    lines = [line for line in out.splitlines() if "did not complete within --dist-timeout" in line]
    assert len(lines) == 1, out[-6000:]
    match = re.search(rf"error: rank 0 at step (\d+): (\w+) did not complete within --dist-timeout "
                      rf"{TIMEOUT_S} s", lines[0])
    assert match and match.group(2) in collective_timeout.COLLECTIVES, lines[0]
    assert int(match.group(1)) >= 2
    # Ended by the timeout (not sooner, not by the test's own limit): the line, then the launcher.
    assert TIMEOUT_S - 5 <= elapsed <= TIMEOUT_S + 120, elapsed


def test_failure_lines():
    collective_timeout.install(12.0)
    collective_timeout.at_step(5)
    assert collective_timeout.failure_line(ValueError("bad flag"), 0) is None
    line = collective_timeout.failure_line(RuntimeError("[gloo] Timed out waiting 12000ms for recv"), 1)
    assert line.startswith("error: rank 1 at step 5: ") and "--dist-timeout 12 s" in line
    lost = collective_timeout.failure_line(
        RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), 0)
    assert "went away (peer " in lost and "127.0.0.1)" in lost and "\n" not in lost
