"""Per-vocabulary-id token importance for semantic-consistent token dropping (SPEC 2.1, 2.3).

One non-trainable fp32 score per vocabulary id, updated after every optimizer step as an
exponential moving average of the masked-LM loss of that id *as a target*::

    imp[v] = beta * imp[v] + (1 - beta) * mean_loss(v)      (only ids seen this step)

Partition-aware (SPEC 2.3): the per-id loss sums and counts are all-reduced over the data-parallel
group before the EMA, so every replica holds one logical, bit-identical table. The per-id
reduction is deterministic on every device (sort + segment sums, no atomics), which is what makes
the table identical across the tensor-parallel ranks that must route identically.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["TokenImportance", "HIGH_SCORE", "LOW_SCORE"]

#: Score pinned on [CLS], [SEP], [MASK], [UNK]: always kept by the router.
HIGH_SCORE = 1.0e4
#: Score pinned on [PAD]: dropped first.
LOW_SCORE = -1.0e4


class TokenImportance(torch.nn.Module):
    """A table of one importance score per vocabulary id, kept as the buffer ``scores``.

    ``scores`` is a registered (persistent) buffer: it is saved in ``state_dict`` / checkpoints
    and follows ``.to(device)``. It always stays fp32, even under ``model.half()`` /
    ``model.bfloat16()`` (a bf16 table would swallow the small EMA increments).

    Args:
        vocab_size: number of vocabulary ids (table length).
        high_ids: ids pinned to ``+1e4`` ([CLS], [SEP], [MASK], [UNK]).
        pad_id: id pinned to ``-1e4`` ([PAD]); ``None`` for no pad id.
        init_value: initial score of every other id (10.0: above any realistic MLM loss, so
            an id's score only drops once it has been seen and predicted well).
        beta: EMA decay, ``0 <= beta < 1`` (checked where the value is set: `TokenDropConfig`).
        dp_group: data-parallel process group over which per-id loss sums and counts are
            all-reduced before the EMA. ``None`` means *no* all-reduce (single replica); pass
            the DP group explicitly in distributed training (``torch.distributed.group.WORLD``
            when every rank is a DP replica). A group of size 1 is a no-op.
    """

    scores: torch.Tensor

    def __init__(
        self,
        vocab_size: int,
        *,
        high_ids: Sequence[int],
        pad_id: int | None,
        init_value: float = 10.0,
        beta: float = 0.95,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        beta = float(beta)
        init_value = float(init_value)
        if not torch.isfinite(torch.tensor(init_value)):
            raise ValueError(f"init_value must be finite, got {init_value}")
        high = [int(i) for i in high_ids]
        for i in high:
            if not 0 <= i < vocab_size:
                raise ValueError(f"high id {i} is out of range for vocab_size {vocab_size}")
        if pad_id is not None:
            pad_id = int(pad_id)
            if not 0 <= pad_id < vocab_size:
                raise ValueError(f"pad_id {pad_id} is out of range for vocab_size {vocab_size}")
            if pad_id in high:
                raise ValueError(f"pad_id {pad_id} is also listed in high_ids {high}")

        self.vocab_size = vocab_size
        self.high_ids: tuple[int, ...] = tuple(sorted(set(high)))
        self.pad_id = pad_id
        self.init_value = init_value
        self.beta = beta
        self.dp_group = dp_group
        self.register_buffer(
            "scores", torch.full((vocab_size,), init_value, dtype=torch.float32), persistent=True
        )
        self._pin()

    # ------------------------------------------------------------------ helpers
    def _pin(self) -> None:
        """Re-apply the pinned scores (special ids high, pad low)."""
        if self.high_ids:
            idx = torch.tensor(self.high_ids, dtype=torch.long, device=self.scores.device)
            self.scores.index_fill_(0, idx, HIGH_SCORE)
        if self.pad_id is not None:
            self.scores[self.pad_id] = LOW_SCORE

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        # Why: DeepSpeed's bf16/fp16 paths call module.bfloat16()/half(), which would cast
        # every floating buffer. Let device moves through, but keep the table in full fp32,
        # copying from the pre-cast tensor so no precision is lost.
        before = self.scores
        super()._apply(fn, recurse)
        after = self.scores
        if after.dtype != torch.float32:
            self._buffers["scores"] = before.to(device=after.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, high_ids={list(self.high_ids)}, pad_id={self.pad_id}, "
            f"init_value={self.init_value}, beta={self.beta}"
        )

    def _dp_world_size(self) -> int:
        if self.dp_group is None or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.dp_group)

    # --------------------------------------------------------------------- API
    def per_id_loss_stats(
        self, target_ids: torch.Tensor, per_token_loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's dense per-id loss sums and counts, both float64 ``[vocab_size]``.

        Deterministic on every device: ids are stably sorted, equal ids form contiguous
        segments, each segment's sum is a difference of a float64 prefix sum, and the result is
        written at the *unique* ids (no atomics, no racy scatter-add). Entries with a negative
        target id (e.g. -100) or a non-finite loss are ignored.
        """
        ids = target_ids.reshape(-1)
        loss = per_token_loss.reshape(-1)
        if ids.numel() != loss.numel():
            raise ValueError(
                f"target_ids has {ids.numel()} elements but per_token_loss has {loss.numel()}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"target_ids must be an integer tensor, got {ids.dtype}")
        device = self.scores.device
        ids = ids.to(device=device, dtype=torch.long)
        loss = loss.detach().to(device=device, dtype=torch.float64)
        # Why: a non-finite loss (e.g. an fp16 overflow step) would poison the table forever.
        valid = (ids >= 0) & torch.isfinite(loss)
        ids = ids[valid]
        loss = loss[valid]
        sums = torch.zeros(self.vocab_size, dtype=torch.float64, device=device)
        counts = torch.zeros(self.vocab_size, dtype=torch.float64, device=device)
        if ids.numel() == 0:
            return sums, counts
        if bool((ids >= self.vocab_size).any()):
            raise ValueError(
                f"target id {int(ids.max())} is out of range for vocab_size {self.vocab_size}"
            )
        sorted_ids, order = torch.sort(ids, stable=True)
        uniq, seg_counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        prefix = torch.cumsum(loss[order], dim=0)
        ends = torch.cumsum(seg_counts, dim=0) - 1
        seg_sums = prefix[ends]
        seg_sums[1:] = seg_sums[1:] - prefix[ends[:-1]]
        sums[uniq] = seg_sums  # unique indices: a plain, deterministic write
        counts[uniq] = seg_counts.to(torch.float64)
        return sums, counts

    @torch.no_grad()
    def update(self, target_ids: torch.Tensor, per_token_loss: torch.Tensor) -> None:
        """EMA-update the scores with this step's per-id mean masked-LM loss.

        Args:
            target_ids: target (label) ids of the step's positions, any shape; entries < 0
                (e.g. -100 for unmasked positions) are ignored.
            per_token_loss: the per-position loss, same number of elements as ``target_ids``.

        When ``dp_group`` is set and has more than one rank, the per-id sums and counts are
        all-reduced over it first (one float64 all-reduce of ``2 * vocab_size``), so every
        replica computes the same mean from the union of their batches and ends with the same
        table. Ids with no valid occurrence (on any replica) keep their score; pinned ids are
        re-pinned. Every rank of the group must call this (it is a collective).
        """
        sums, counts = self.per_id_loss_stats(target_ids, per_token_loss)
        if self._dp_world_size() > 1:
            stats = torch.stack((sums, counts))
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.dp_group)
            sums, counts = stats[0], stats[1]
        seen = counts > 0
        mean = sums / counts.clamp_min(1.0)
        # EMA in float64, stored as fp32; torch.where keeps it vectorized (no host sync).
        ema = self.beta * self.scores.to(torch.float64) + (1.0 - self.beta) * mean
        self.scores.copy_(torch.where(seen, ema, self.scores.to(torch.float64)))
        self._pin()
