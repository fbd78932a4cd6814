"""Bring-up of torch.distributed, megatron-core's parallel_state and the seeds, in one call.

The model code never imports parallel_state: it receives a `ParallelContext` with the groups
it needs. DeepSpeed receives `MegatronMPU`, the adapter it expects as `mpu`.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sctd_dist.parallel import collective_timeout, launch_env
from sctd_dist.parallel.random import set_seeds

# megatron-core warns at import about optional CUDA-only extensions we do not use.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*APEX is not installed.*")


@dataclass(frozen=True)
class ParallelContext:
    """The process groups and ranks the model and the training loop need."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size


def check_tp_size(tp_size: int, world_size: int) -> None:
    """Fail before any group is made when the TP size cannot tile the world."""
    if tp_size < 1:
        raise ValueError(f"--tensor-model-parallel-size must be >= 1, got {tp_size}")
    if world_size % tp_size:
        raise ValueError(
            f"--tensor-model-parallel-size {tp_size} does not divide the world size {world_size}; "
            f"choose a TP size among the divisors of {world_size}: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )


def pick_device(local_rank: int) -> torch.device:
    """The CUDA device of this local rank when GPUs exist, otherwise the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(
    tensor_model_parallel_size: int = 1,
    *,
    sequence_parallel: bool = False,
    seed: int = 1234,
    timeout_s: float = 1800.0,
) -> ParallelContext:
    """Initialise torch.distributed (via DeepSpeed) and megatron-core's TP/DP groups; seed RNGs.

    Works under the deepspeed launcher, torchrun, srun (SLURM variables) and mpirun, with NCCL on
    GPUs and gloo on CPU. Calling it again with the same TP size returns the same context.
    Every process group waits `timeout_s` seconds at most for a collective (`--dist-timeout`).
    """
    # Read when the CUDA context is made (pick_device below): setting it later does nothing.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import deepspeed
    from megatron.core import parallel_state as ps

    collective_timeout.install(timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    info = launch_env.discover()
    check_tp_size(tensor_model_parallel_size, info.world_size)
    launch_env.export(info)
    device = pick_device(info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized() and info.launcher == "single":
        # One process and no launcher: an in-memory store needs no address or port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,  # launch_env already mapped MPI/SLURM variables
            verbose=False,
            timeout=timeout,
        )
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tensor_model_parallel_size:
            raise RuntimeError("parallel state already initialised with another TP size")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            distributed_timeout_minutes=timeout_s / 60,  # a timedelta's minutes: fractions work
            create_gloo_process_groups=False,
        )
    ctx = ParallelContext(
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        device=device,
    )
    set_seeds(seed, dp_rank=ctx.dp_rank, tp_rank=ctx.tp_rank, device=device)
    return ctx


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for, answering from megatron-core's parallel_state.

    DeepSpeed calls the older `get_model_parallel_*` names, which parallel_state no longer has,
    and newer DeepSpeed code paths the `get_tensor_model_parallel_*` ones: both are served.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        for what in ("rank", "world_size", "group"):
            tensor = getattr(ps, f"get_tensor_model_parallel_{what}")
            setattr(self, f"get_model_parallel_{what}", tensor)
            setattr(self, f"get_tensor_model_parallel_{what}", tensor)
            setattr(self, f"get_data_parallel_{what}", getattr(ps, f"get_data_parallel_{what}"))
