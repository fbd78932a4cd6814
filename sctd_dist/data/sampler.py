"""The global sample stream and who gets which part of it, computed in O(1) from a position.

Stream: position c (= samples consumed so far, over all ranks and epochs) maps to
epoch e = c // E and dataset row perm_e(c % E), where E is the number of samples per epoch and
perm_e a keyed pseudo-random permutation of (seed, e) (see `rng.FeistelPermutation`), and
E = N - N % global_batch (each epoch drops a different random remainder and no global batch
straddles two epochs).

Split of a step (Megatron's layout): the optimizer step starting at c covers positions
[c, c + global_batch); micro-step j of DP rank r takes positions
c + j*micro*dp + r*micro ... + micro. The union over ranks of a step never depends on the DP
size, so resuming with another number of replicas (same global batch) continues the same stream.
Tensor-parallel ranks of one replica share the DP rank, hence the batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rng import DOMAIN_SHUFFLE, FeistelPermutation


@dataclass(frozen=True)
class SampleStream:
    """Positions in the global stream -> (dataset row, epoch)."""

    num_samples: int
    global_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("the dataset is empty")
        if self.global_batch_size < 1:
            raise ValueError(f"global batch size must be >= 1, got {self.global_batch_size}")
        if self.samples_per_epoch < 1:
            raise ValueError(f"the dataset has {self.num_samples} rows, fewer than one global batch "
                             f"({self.global_batch_size}): lower the global batch size or use more data")

    @property
    def samples_per_epoch(self) -> int:
        return self.num_samples - self.num_samples % self.global_batch_size

    def epoch_of(self, position: int) -> int:
        return int(position) // self.samples_per_epoch

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset row, epoch) of every stream position (any shape, any order)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and pos.min() < 0:
            raise ValueError("stream positions must be >= 0")
        epochs = pos // self.samples_per_epoch
        within = pos % self.samples_per_epoch
        rows = np.empty_like(pos)
        for e in np.unique(epochs):  # one or two epochs per step
            sel = epochs == e
            rows[sel] = FeistelPermutation(self.num_samples, (DOMAIN_SHUFFLE, self.seed, int(e)))(within[sel])
        return rows, epochs


def step_positions(consumed_samples: int, *, global_batch_size: int, micro_batch_size: int,
                   dp_rank: int, dp_size: int) -> np.ndarray:
    """Stream positions of DP rank `dp_rank` for the step starting at `consumed_samples`: [accum, micro]."""
    accum = check_batch_sizes(global_batch_size, micro_batch_size, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    j = np.arange(accum, dtype=np.int64)[:, None]
    i = np.arange(micro_batch_size, dtype=np.int64)[None, :]
    return consumed_samples + j * micro_batch_size * dp_size + dp_rank * micro_batch_size + i


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Gradient-accumulation steps per optimizer step; ValueError unless the sizes divide."""
    if micro_batch_size < 1 or dp_size < 1 or global_batch_size < 1:
        raise ValueError(f"batch sizes and dp_size must be >= 1 (global {global_batch_size}, "
                         f"micro {micro_batch_size}, dp {dp_size})")
    per_pass = micro_batch_size * dp_size
    if global_batch_size % per_pass:
        lower = max(per_pass, global_batch_size // per_pass * per_pass)
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by micro batch size x data-parallel "
            f"size = {micro_batch_size} x {dp_size} = {per_pass}; use a global batch of {lower} or "
            f"{lower + per_pass}, or change the micro batch size")
    return global_batch_size // per_pass
