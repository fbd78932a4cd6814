"""How the processes of a job coordinate: who they are, waiting for each other, one going first,
and files that no process (and no crash) ever sees half-written.

Every function also works in a plain single process (no process group): rank 0 of 1.
`torch.distributed` is imported on first use, so data tools that only write files stay light.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _dist() -> Any:
    """torch.distributed when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank(group: Any = None) -> int:
    """This process's rank in `group` (the whole job by default); 0 without a process group."""
    dist = _dist()
    return dist.get_rank(group) if dist is not None else 0


def world_size(group: Any = None) -> int:
    """Processes in `group` (the whole job by default); 1 without a process group."""
    dist = _dist()
    return dist.get_world_size(group) if dist is not None else 1


def is_rank0() -> bool:
    """True on the job's rank 0 (the process that writes shared files and logs)."""
    return rank() == 0


def say(line: str) -> None:
    """One line on stderr from rank 0 (what every rank knows is said once)."""
    if is_rank0():
        print(line, file=sys.stderr, flush=True)


def barrier() -> None:
    """Wait until every rank of the job gets here (nothing to wait for in one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (str: UTF-8) so that readers see the old or the new content,
    never a part: write a temporary file beside it, flush it to disk, rename it over `path`,
    then flush the folder (which makes the rename itself survive a power loss)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def share_work(fn: Callable[[T], Any], items: list[T]) -> dict[T, Any]:
    """`{item: fn(item)}` for every item, each computed on one rank (round robin) and shared
    with all: for per-file work such as checksums, which no rank should do alone."""
    mine = {item: fn(item) for i, item in enumerate(items) if i % world_size() == rank()}
    dist = _dist()
    if dist is None:
        return mine
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def rank0_decides(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its result, or raise its error on every rank
    (the same ValueError message): for checks of shared files that one process should make."""
    outcome: list[Any] = [None, None]
    if is_rank0():
        try:
            outcome = [fn(), None]
        except ValueError as exc:
            outcome = [None, exc]
    dist = _dist()
    if dist is not None:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
