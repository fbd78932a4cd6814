"""One run per --save folder, with the real entry point (torchrun, one CPU rank, tiny model).

A second run started on a live run's folder stops before any work with one line naming the
holder, and the first run finishes untouched (the first is held with SIGSTOP while the second
starts, so that it is certainly alive then, whatever the machine's speed). A run killed with SIGKILL leaves its lock behind;
the next run on the folder takes it over (a logged event) and resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from sctd_dist import checkpoint
from sctd_dist.run_lock import LOCK_FILE
from tests.conftest import SEQ
from tests.training import launch


def _args(tmp, data_dir, iters: int, logs: str = "logs") -> list[str]:
    return ["--data-path", str(data_dir), "--seq-length", str(SEQ), "--train-iters", str(iters),
            "--global-batch-size", "4", "--micro-batch-size", "2", "--eval-iters", "0",
            "--save", str(tmp / "ckpt"), "--save-interval", "4", "--log-dir", str(tmp / logs),
            "--no-progress"]


def test_second_run_refused_first_untouched_then_sigkill_taken_over(tmp_path, data_dir):
    save, lock = tmp_path / "ckpt", tmp_path / "ckpt" / LOCK_FILE
    first = launch.start(1, *_args(tmp_path, data_dir, 24))
    metrics = tmp_path / "logs" / "metrics.jsonl"
    launch.wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), first)
    (worker,) = [p for p in launch._workers(first) if "train.py" in " ".join(p.cmdline())]
    worker.suspend()
    try:
        holder = json.loads(lock.read_text())
        # A second run on the same folder while the first lives: refused with one line.
        # (one process, no launcher: torchrun would add its own traceback of a failed worker)
        second = subprocess.run([sys.executable, str(launch.TRAIN), *_args(tmp_path, data_dir, 24, "logs2")],
                                cwd=launch.REPO, env=launch.env(), capture_output=True, text=True,
                                timeout=400)
    finally:
        worker.resume()
    assert second.returncode != 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"--save {save} belongs to a running run ({holder['host']} pid {holder['pid']}" in errors[0]
    assert not (tmp_path / "logs2").exists()  # no work started

    # The first run finishes as if alone, and releases the folder.
    out, _ = first.communicate(timeout=400)
    assert first.returncode == 0, out[-4000:]
    assert sorted(launch.losses(tmp_path / "logs")) == list(range(24))
    assert checkpoint.latest_tag(save) == "global_step24" and not lock.exists()
    assert not launch.events(tmp_path / "logs", "run_lock_takeover")

    # Extend the run, SIGKILL it after its next checkpoint: the lock stays with a dead pid.
    third = launch.start(1, *_args(tmp_path, data_dir, 10000))
    launch.wait_for(lambda: checkpoint.latest_tag(save) not in (None, "global_step24"), third, timeout=400)
    dead = json.loads(lock.read_text())["pid"]
    launch.kill(third, signal.SIGKILL)
    third.wait()
    assert json.loads(lock.read_text())["pid"] == dead
    saved = int(checkpoint.latest_tag(save).removeprefix("global_step"))

    # The same command again takes the folder over and resumes where the killed run saved.
    done = launch.train(1, *_args(tmp_path, data_dir, saved + 4), timeout=400)
    assert "taking over the run lock" in done.stderr and "is not running" in done.stderr
    (takeover,) = launch.events(tmp_path / "logs", "run_lock_takeover")
    assert takeover["previous"]["pid"] == dead and "is not running" in takeover["reason"]
    resume = launch.events(tmp_path / "logs", "resume")[-1]
    assert resume["step"] == saved and resume["checkpoint"] == checkpoint.tag_for(saved)
    assert launch.events(tmp_path / "logs", "summary")[-1]["steps"] == saved + 4
    assert checkpoint.latest_tag(save) == checkpoint.tag_for(saved + 4) and not lock.exists()
