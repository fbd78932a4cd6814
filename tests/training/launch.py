"""Run `sctd_dist/train.py` the way users do (torchrun, N CPU ranks) and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "sctd_dist" / "train.py"


def fp32_config(src: str, dest: Path) -> Path:
    """A copy of ds_configs/`src` with bf16/fp16 off (exact-restart tests compare fp32 losses)."""
    cfg = json.loads((REPO / "ds_configs" / src).read_text())
    cfg.pop("bf16", None)
    cfg.pop("fp16", None)
    dest.write_text(json.dumps(cfg))
    return dest


def command(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TRAIN), *args]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def train(ranks: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; fail with the output when the job fails."""
    proc = subprocess.run(command(ranks, *args), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def start(ranks: int, *args: str) -> subprocess.Popen:
    """Start in its own process group, so the whole job can be signalled or killed."""
    return subprocess.Popen(command(ranks, *args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_after_checkpoint(ranks: int, save_dir: Path, tag: str, *args: str) -> None:
    """Start a job, SIGKILL all of it as soon as `save_dir`'s `latest` names `tag`, wait."""
    proc = start(ranks, *args)
    latest = Path(save_dir) / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text() == tag, proc)
    kill(proc, signal.SIGKILL)
    proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early ({proc.returncode}):\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.05)


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the whole job at once: torchrun starts each worker in a session of its own, so
    signalling torchrun's process group would leave the workers running."""
    for p in _workers(proc):
        try:
            p.send_signal(sig)
        except Exception:  # already gone
            pass
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def signal_workers(proc: subprocess.Popen, sig: int) -> None:
    """Signal the training processes only (as SLURM signals every task of a job step)."""
    for p in _workers(proc):
        if "train.py" in " ".join(p.cmdline()):
            p.send_signal(sig)


def losses(log_dir: Path) -> dict[int, float]:
    """Loss per optimizer step; a restarted run's records replace the killed run's."""
    out: dict[int, float] = {}
    for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def events(log_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (Path(log_dir) / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == kind]
