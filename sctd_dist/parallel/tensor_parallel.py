"""megatron-core's tensor-parallel layers with forwards that `torch.compile` traces in one graph.

The classes keep megatron-core's parameter creation, sharded initialisation, TP attributes and
checkpoint hooks; only `forward` is ours. Why: megatron-core 0.16's RowParallelLinear passes
`tp_group=None` to its linear function, which then calls `warnings.warn` on every forward (a
graph break each time), and its linear is an autograd Function built for CUDA-only extras
(fused gradient accumulation, async communication, SP buffers) that this project never enables.
Without those extras the layer is one `F.linear` (a fused bias GEMM) plus megatron-core's own
communication mapping, always called with the explicit process group.

Imported lazily by `sctd_dist.parallel.layers` (importing megatron.core takes seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear as _McoreColumn
from megatron.core.tensor_parallel import RowParallelLinear as _McoreRow
from megatron.core.tensor_parallel import VocabParallelEmbedding as _McoreEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_pg_size

from sctd_dist.parallel.tied_embedding import TiedWeight, lookup


class _StaticGroupSize:
    """Records the TP group's size as a plain int at construction: a compiled graph specialises
    on it instead of asking the process group on every call (no group: one rank)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tp_world = get_pg_size(self.tp_group)


class ColumnParallelLinear(_StaticGroupSize, _McoreColumn):
    """Output-sharded linear; the input arrives through `layers.enter_tp_region` (which owns the
    backward all-reduce), so the layer itself does no communication."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """(x W_shard^T + b_shard, None): megatron-core's (output, bias) convention."""
        return F.linear(x, self.weight, self.bias), None


class RowParallelLinear(_StaticGroupSize, _McoreRow):
    """Input-sharded linear. With `partial_output` (sequence parallelism) it returns the partial
    sums and the bias, and the caller reduce-scatters; otherwise it all-reduces and adds the bias."""

    partial_output: bool = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """(output, None), or (partial sums, bias) when `partial_output`."""
        if self.partial_output:
            return F.linear(x, self.weight), self.bias
        if self.tp_world == 1:
            return F.linear(x, self.weight, self.bias), None
        out = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), group=self.tp_group)
        return (out if self.bias is None else out + self.bias), None


class VocabParallelEmbedding(_StaticGroupSize, _McoreEmbedding):
    """Vocabulary-sharded lookup whose weight gradient only touches the looked-up rows, added
    into the tied MLM decoder's gradient (`tied_embedding`; the decoder joins through `tied`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tied: TiedWeight | None = TiedWeight()  # None: plain autograd gradients

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Embeddings of global ids [b, s] -> [b, s, h], summed over the TP group."""
        if self.tp_world == 1:
            return lookup(input_, self.weight, self.tied)
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        rows = lookup(local, self.weight, self.tied)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)  # another shard owns these ids
        return reduce_from_tensor_model_parallel_region(rows, group=self.tp_group)
