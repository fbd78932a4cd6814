"""Device-neutral RNG streams for tensor parallelism.

Replicated regions (hidden dropout, the embeddings) must draw the same random numbers on every
TP rank of a replica; TP-sharded regions (attention-probability dropout over this rank's heads)
must draw different ones. megatron-core's tracker only works on CUDA, so this one swaps the
default generator's state on whichever device the model runs on.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

# Offset of the TP-sharded stream, far from the replicated seeds of other replicas.
_SHARDED_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _key(device: torch.device | str) -> str:
    # Keyed by device type, not "cuda:N": a resume whose rank lands on another local GPU index
    # must find its stream (one process drives one device).
    return str(device).split(":")[0]


class ShardedRNG:
    """A second RNG stream that differs between TP ranks; the default stream stays replicated."""

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}

    def seed(self, seed: int, device: torch.device) -> None:
        """Start the sharded stream for `device` from `seed` (already made rank-specific)."""
        saved = _get_state(device)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        self._states[_key(device)] = _get_state(device)
        _set_state(device, saved)

    @contextlib.contextmanager
    def fork(self, device: torch.device) -> Iterator[None]:
        """Run the enclosed ops on the sharded stream, then return to the replicated one."""
        key = _key(device)
        if key not in self._states:
            # Unseeded (single-process use, tests): the default stream is fine.
            yield
            return
        saved = _get_state(device)
        _set_state(device, self._states[key])
        try:
            yield
        finally:
            self._states[key] = _get_state(device)
            _set_state(device, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Snapshot (for checkpoints and activation recomputation)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot taken by `get_states` (older snapshots keyed "cuda:N" too)."""
        self._states = {_key(k): v.clone() for k, v in states.items()}


SHARDED_RNG = ShardedRNG()


def set_seeds(seed: int, *, dp_rank: int, tp_rank: int, device: torch.device) -> None:
    """Seed python/numpy/torch so DP replicas differ and TP ranks share the replicated stream.

    The replicated stream depends on the DP rank only; the sharded stream also on the TP rank.
    """
    replica_seed = seed + 100 * dp_rank
    random.seed(replica_seed)
    np.random.seed(replica_seed % (2**32))
    torch.manual_seed(replica_seed)
    SHARDED_RNG.seed(replica_seed + _SHARDED_SEED_OFFSET + tp_rank, device)


def checkpoint_context_fn():
    """`context_fn` for torch.utils.checkpoint: recomputation replays the sharded stream too.

    torch's checkpoint restores the default generator; the sharded stream must be restored by us
    or recomputed attention dropout would differ from the forward's.
    """
    snapshot = SHARDED_RNG.get_states()

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        current = SHARDED_RNG.get_states()
        SHARDED_RNG.set_states(snapshot)
        try:
            yield
        finally:
            SHARDED_RNG.set_states(current)

    return contextlib.nullcontext(), replay()
