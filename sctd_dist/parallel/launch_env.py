"""Discover rank, world size and rendezvous address from whichever launcher started us.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
`srun` exports only SLURM_* variables and mpirun only OMPI_*/PMI_* ones, and DeepSpeed reads
neither SLURM's nor (without mpi4py) MPI's, so we map them to the torch.distributed variables here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, and who started it."""

    launcher: str  # "env" (torchrun/deepspeed), "slurm", "mpi" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: ask scontrol (it expands ranges like node[01-04])."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: a plain comma list or a single host still works.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split("-")[0].split(",")[0].rstrip("]")
        return prefix + first
    return head


def _slurm_port(job_id: str | None) -> int:
    # Derive the port from the job id so concurrent jobs on shared nodes do not collide.
    if job_id and job_id.isdigit():
        return 20000 + int(job_id) % 20000
    return DEFAULT_PORT


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables; explicit RANK/WORLD_SIZE win over SLURM and MPI ones."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            launcher="env",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return LaunchInfo(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID"))),
        )
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
        world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1)))
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        return LaunchInfo(
            launcher="mpi",
            rank=rank,
            world_size=world,
            local_rank=local,
            master_addr=env.get("MASTER_ADDR") or _mpi_master_addr(rank),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        )
    return LaunchInfo("single", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", DEFAULT_PORT)))


def _mpi_master_addr(rank: int) -> str:
    """Rank 0's hostname, broadcast through mpi4py (no MASTER_ADDR under plain mpirun)."""
    import socket

    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a dependency
        raise RuntimeError("started under MPI but mpi4py is missing; set MASTER_ADDR") from exc
    return MPI.COMM_WORLD.bcast(socket.gethostname() if rank == 0 else None, root=0)


def export(info: LaunchInfo, env: MutableMapping[str, str] | None = None) -> None:
    """Write the torch.distributed variables so DeepSpeed's env:// init finds them."""
    env = os.environ if env is None else env
    env["RANK"] = str(info.rank)
    env["WORLD_SIZE"] = str(info.world_size)
    env["LOCAL_RANK"] = str(info.local_rank)
    env["MASTER_ADDR"] = info.master_addr
    env["MASTER_PORT"] = str(info.master_port)
