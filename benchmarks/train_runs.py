"""Run the real training entry point (`sctd_dist/train.py` under torchrun) and summarise its log.

The end-to-end benchmarks (ZeRO stages, TP/DP scaling, the GPU throughput script) measure what a
user's job measures: `metrics.jsonl` as written by the training loop, one record per optimizer
step. Nothing is timed from outside the process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO_ROOT, loadavg, median

TRAIN_PY = REPO_ROOT / "sctd_dist" / "train.py"
HF_TRAIN_PY = REPO_ROOT / "benchmarks" / "hf_train.py"  # transformers' model, the same loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainingRunFailed(RuntimeError):
    """train.py exited non-zero or ran past its timeout; the message holds its stderr tail."""


def _kill_tree(pid: int) -> None:
    """Kill torchrun and every rank under it. torchrun starts its ranks in sessions of their own,
    so a process-group kill would leave them running (and holding GPU memory for the next run)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_training(train_args: list[str], nproc: int, log_dir: Path, *,
                 threads_per_rank: int = 1, timeout: float | None = None, script: Path = TRAIN_PY,
                 tuned_allocator: bool = True) -> list[dict[str, Any]]:
    """Run train.py (or `script`, which takes its flags) on `nproc` local ranks with `train_args`
    (plus --log-dir/--no-progress) and return the step records of its metrics.jsonl, under the
    tuned CPU allocator unless told otherwise. A failed run raises TrainingRunFailed: a number
    from a half-run job would be meaningless."""
    from sctd_dist import allocator

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *train_args, "--log-dir", str(log_dir), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank))
    if tuned_allocator:
        env = allocator.environment(allocator.choose(env), env)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        _, stderr = proc.communicate()
        raise TrainingRunFailed(f"training run timed out after {timeout} s ({' '.join(train_args)}):\n"
                                f"{stderr[-4000:]}") from None
    if proc.returncode != 0:
        raise TrainingRunFailed(f"training run failed ({' '.join(train_args)}):\n{stderr[-4000:]}")
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r]


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Throughput and memory of the steps after `warmup`.

    tokens/s is total tokens over total time (not a median of per-step rates), so the occasional
    slower step (ScTD's consistency step) counts with its true weight; the median per-step rate is
    kept too."""
    timed = records[warmup:] or records
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    out: dict[str, Any] = {
        "steps_timed": len(timed),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_median_step": median(r["tokens_per_s"] for r in timed),
        "step_time_s_per_step": [r["step_time_s"] for r in records],
        "tflops_per_device": sum(r["tflops_per_device"] * r["step_time_s"] for r in timed) / seconds,
        "peak_memory_bytes_rank0": max(r["memory_peak_bytes"] for r in records),
        "model_state_bytes_rank0": records[0].get("model_state_bytes"),
        "final_loss": records[-1].get("loss"),
        "loadavg_after": loadavg(),
    }
    if all("mfu" in r for r in timed):
        out["mfu"] = sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds
    return out
