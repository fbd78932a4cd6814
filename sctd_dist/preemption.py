"""Save-and-exit on SIGTERM/SIGUSR1 (SLURM preemption, `scancel --signal`), at a step boundary.

The handler only sets a flag; the training loop checks it between optimizer steps and all ranks
agree through an all-reduce, so every rank saves the same step and exits 0.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from sctd_dist.coordination import world_size

_requested = {"signal": None}


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _requested["signal"] = signum


def install() -> None:
    """Route SIGTERM and SIGUSR1 to the flag (call once, in the main thread)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def requested_locally() -> bool:
    return _requested["signal"] is not None


def stop_requested(device: torch.device) -> bool:
    """True on every rank when any rank received a stop signal."""
    flag = torch.tensor([1.0 if requested_locally() else 0.0], device=device)
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
