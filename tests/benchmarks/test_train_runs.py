"""The benchmarks' runner of train.py: a run past its timeout fails and leaves no rank behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import SEQ

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_runs import TrainingRunFailed, run_training  # noqa: E402


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_timeout_kills_torchrun_and_its_ranks(data_dir: Path, tmp_path: Path) -> None:
    args = ["--deepspeed_config", str(REPO / "ds_configs" / "cpu_tiny.json"), "--data-path", str(data_dir),
            "--seq-length", str(SEQ), "--train-iters", "100000", "--eval-iters", "0"]
    with pytest.raises(TrainingRunFailed, match="timed out"):
        run_training(args, nproc=2, log_dir=tmp_path / "logs", timeout=8)
    deadline = time.monotonic() + 10
    while _leftovers(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(str(tmp_path)) == []
