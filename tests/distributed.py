"""The one helper that runs a function on N real gloo ranks for the multi-process tests.

`run_ranks(fn, world_size, *args)` spawns `world_size` fresh processes, sets the same environment
variables the launchers set (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), calls
`fn(rank, world_size, *args)` in each and returns the list of their return values (rank order).
`fn` must be importable (a module-level function) and usually starts with
`sctd_dist.parallel.initialize(...)` or `torch.distributed.init_process_group("gloo")`.
A failure on any rank re-raises here with that rank's traceback; a hang fails after `timeout`.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now (each test gets its own: xdist-safe)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        # Serialise by value: shared-memory tensor handles die with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # report any failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                time.sleep(0.5)
                if queue.empty():
                    break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            import torch

            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(results) < world_size:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"ranks did not all report within {timeout}s (exit codes {codes})")
    return [results[r] for r in range(world_size)]
