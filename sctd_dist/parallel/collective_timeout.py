"""A rank that stops responding ends the job within `--dist-timeout`, with one line saying where.

Every process group is made with the timeout (`parallel.state.initialize`), so a collective that
waits for a stopped, hung or lost rank fails after that many seconds (gloo raises; NCCL's watchdog
aborts the process when TORCH_NCCL_ASYNC_ERROR_HANDLING is on, as slurm/common.sh sets). To say
which collective it was, the collectives of `torch.distributed` are wrapped once to remember the
name of one that failed; the training loop says which step it is at (`at_step`), and
`failure_line` turns the error into the line the run prints before exiting.
"""

from __future__ import annotations

import functools
import re
import socket
import sys
from typing import Any, Callable

import torch.distributed as dist

# The collectives our code, DeepSpeed and megatron-core call through `torch.distributed`.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "barrier", "all_gather_object", "broadcast_object_list",
               "all_to_all_single", "reduce", "gather", "scatter", "send", "recv",
               "all_reduce_coalesced", "monitored_barrier")

_where: dict[str, Any] = {"step": None, "failed": None, "timeout_s": None}


def at_step(step: int) -> None:
    """The loop works on optimizer step `step` (0-based) now."""
    _where["step"] = step


def _watched(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            _where["failed"] = _where["failed"] or name  # the first failure is the cause
            raise

    call.__sctd_watched__ = True  # type: ignore[attr-defined]
    return call


def install(timeout_s: float) -> None:
    """Remember `timeout_s` for the message and wrap the collectives (once per process)."""
    _where["timeout_s"] = timeout_s
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "__sctd_watched__", False):
            setattr(dist, name, _watched(name, fn))


def _is_comm_failure(exc: BaseException) -> bool:
    """A collective that timed out or whose peer went away (not a user's mistake, not a bug)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Timed out", "timed out", "Connection closed", "Connection reset",
                                  "NCCL", "Socket Timeout"))


def failure_line(exc: BaseException, rank: int) -> str | None:
    """The one line to print for `exc` when it is a failed collective, else None."""
    if not _is_comm_failure(exc):
        return None
    step = "before the first step" if _where["step"] is None else f"at step {_where['step']}"
    name = _where["failed"] or "a collective"
    text = str(exc)
    if "imed out" in text or "Timeout" in text:
        why = f"did not complete within --dist-timeout {_where['timeout_s']:g} s: another rank stopped responding"
    else:
        why = f"failed because another rank went away{_peer(text)} (its process or node was lost)"
    detail = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return f"error: rank {rank} {step}: {name} {why}; ending the run ({detail})"


def _peer(text: str) -> str:
    """` (peer HOST, ADDR)` when gloo's message names the address of the peer that went away."""
    found = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    if not found:
        return ""
    addr = found.group(1)
    try:
        host = socket.gethostbyaddr(addr)[0]
    except OSError:
        return f" (peer {addr})"
    return f" (peer {host}, {addr})"


def report(exc: BaseException, rank: int) -> bool:
    """Print `failure_line` on stderr and return True when `exc` is a failed collective."""
    line = failure_line(exc, rank)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    return line is not None
