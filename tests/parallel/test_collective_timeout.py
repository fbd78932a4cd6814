"""--dist-timeout: a rank that stops responding (SIGSTOP) makes the others' collective fail within
the timeout, with one line naming the step and the collective. Real gloo ranks, with the groups
made by `sctd_dist.parallel.initialize` (DeepSpeed's world group, megatron-core's DP group); the
same through train.py and SLURM is in tests/launchers/test_slurm_cluster.py."""

from __future__ import annotations

import os
import re
import signal
import time

from sctd_dist.parallel import collective_timeout
from tests.distributed import run_ranks

TIMEOUT_S = 4.0


def _stop_one_rank(rank: int, world_size: int) -> dict:
    import torch
    import torch.distributed as dist

    from sctd_dist.parallel import initialize

    ctx = initialize(1, timeout_s=TIMEOUT_S)
    pids = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    collective_timeout.at_step(7)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # hangs here until rank 0 lets it go
        return {"resumed": True}
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=ctx.dp_group)
    except Exception as exc:  # noqa: BLE001 - the failure under test
        line = collective_timeout.failure_line(exc, rank)
    else:
        line = None
    elapsed = time.monotonic() - t0
    os.kill(pids[1], signal.SIGCONT)
    return {"line": line, "elapsed": elapsed}


def test_a_stopped_rank_fails_the_others_within_the_timeout():
    first, stopped = run_ranks(_stop_one_rank, 2, timeout=120)
    assert stopped == {"resumed": True}
    assert first["line"] is not None, "the collective did not fail"
    assert re.match(rf"error: rank 0 at step 7: all_reduce did not complete within --dist-timeout "
                    rf"{TIMEOUT_S:g} s: another rank stopped responding", first["line"]), first["line"]
    assert "\n" not in first["line"]
    assert TIMEOUT_S - 1 <= first["elapsed"] <= TIMEOUT_S + 20, first["elapsed"]


def test_failure_lines():
    collective_timeout.install(12.0)
    collective_timeout.at_step(5)
    assert collective_timeout.failure_line(ValueError("bad flag"), 0) is None
    line = collective_timeout.failure_line(RuntimeError("[gloo] Timed out waiting 12000ms for recv"), 1)
    assert line.startswith("error: rank 1 at step 5: ") and "--dist-timeout 12 s" in line
    lost = collective_timeout.failure_line(
        RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4242"), 0)
    assert "went away (peer " in lost and "127.0.0.1)" in lost and "\n" not in lost
