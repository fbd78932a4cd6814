"""Tensor- and sequence-parallel building blocks that the plain BERT code is assembled from.

The linear layers and the vocabulary embedding are megatron-core's. What is ours is how
activations enter and leave a TP region: one input all-reduce (backward) shared by Q, K and V
instead of one per projection, and sequence parallelism done with device-neutral collectives
(megatron-core's SP path allocates CUDA buffers and cannot run under gloo).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from sctd_dist.parallel import kernels, mappings, sharded_ops
from sctd_dist.parallel.random import SHARDED_RNG
from sctd_dist.parallel.state import ParallelContext


def _mcore_config(ctx: ParallelContext, params_dtype: torch.dtype = torch.float32):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU initialisation draws the full matrix from the replicated RNG and slices it, so every
    # TP size starts from the same logical weights (and needs no CUDA RNG tracker).
    return ModelParallelConfig(
        tensor_model_parallel_size=ctx.tp_size,
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        gradient_accumulation_fusion=False,
    )


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """BERT's weight initialisation: N(0, std)."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _drop_extra_state(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    # megatron-core layers add an empty `_extra_state` entry (for TransformerEngine); it holds
    # nothing and trips tools that expect tensors (DeepSpeed's universal-checkpoint converter).
    state_dict.pop(prefix + "_extra_state", None)


def _without_extra_state(module: nn.Module) -> nn.Module:
    module.register_state_dict_post_hook(_drop_extra_state)
    return module


def column_parallel_linear(in_features: int, out_features: int, ctx: ParallelContext, std: float,
                           bias: bool = True, stride: int = 1):
    """Output-sharded linear; the caller routes its input through `enter_tp_region`.

    `stride` > 1: the output is `stride` fused blocks (Q|K|V, or a GLU's input|gate), and each
    rank holds its slice of every block, so a fused layer splits like its unfused parts."""
    from sctd_dist.parallel.tensor_parallel import ColumnParallelLinear

    return _without_extra_state(ColumnParallelLinear(
        in_features, out_features, config=_mcore_config(ctx), init_method=normal_init(std),
        bias=bias, gather_output=False, disable_grad_reduce=True, tp_group=ctx.tp_group, stride=stride,
    ))


def row_parallel_linear(in_features: int, out_features: int, ctx: ParallelContext, std: float,
                        bias: bool = True):
    """Input-sharded linear; use `row_parallel_forward` to run it."""
    from sctd_dist.parallel.tensor_parallel import RowParallelLinear

    sequence_parallel = ctx.sequence_parallel and ctx.tp_size > 1
    layer = RowParallelLinear(
        in_features, out_features, config=_mcore_config(ctx), init_method=normal_init(std),
        bias=bias, input_is_parallel=True, skip_bias_add=sequence_parallel, tp_group=ctx.tp_group,
    )
    # megatron-core's own SP reduce-scatter needs CUDA: under SP the layer returns its partial
    # sums and the caller communicates. The layer still runs through its own forward, which
    # ZeRO-3 needs to gather its weight.
    layer.partial_output = sequence_parallel
    if sequence_parallel and bias:  # its bias is added to a sequence slice (`row_parallel_forward`)
        layer.sequence_parallel_params = ("bias",)
    return _without_extra_state(layer)


def vocab_parallel_embedding(num_embeddings: int, dim: int, ctx: ParallelContext, std: float,
                             real_rows: int | None = None):
    """Vocabulary-sharded embedding (output replicated over the TP group); a decoder tied to its
    weight runs through `tied_decoder_cross_entropy`.

    `real_rows`: the unpadded vocabulary size. Only those rows are drawn at random and padding
    rows start at zero: the padding grows with the TP size, and drawing it too would make the
    initial model (and every draw after it) depend on the TP size."""
    from sctd_dist.parallel.tensor_parallel import VocabParallelEmbedding

    rows = num_embeddings if real_rows is None else real_rows

    def init(w: torch.Tensor) -> torch.Tensor:  # w: the whole padded matrix, on the CPU
        normal_init(std)(w[:rows])
        return w[rows:].zero_()

    return VocabParallelEmbedding(
        num_embeddings, dim, init_method=init, config=_mcore_config(ctx), tp_group=ctx.tp_group,
    )


def tied_decoder_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, vocab_start: int, tied,
                                ctx: ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token MLM loss and number correct of replicated rows `h` [n, hidden] against global
    target ids, with the decoder tied to a `vocab_parallel_embedding`'s weight (`tied`: its
    `.tied`): one fused decoder + vocab-parallel cross-entropy (`vocab_cross_entropy`), whose
    weight gradient is assembled without a second V x h buffer (`tied_embedding`)."""
    from sctd_dist.parallel.tied_embedding import decoder_slot
    from sctd_dist.parallel.vocab_cross_entropy import decoder_cross_entropy

    group = ctx.tp_group if ctx.tp_size > 1 else None
    return decoder_cross_entropy(copy_to_tensor_parallel(h, ctx), weight, bias, targets,
                                 vocab_start, group, decoder_slot(tied))


def mark_tensor_parallel(param: torch.Tensor, dim: int = 0) -> None:
    """Flag a parameter we shard ourselves, so grad-norm code does not count it TP times."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def enter_tp_region(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Make the full input of column-parallel layers from this rank's activations.

    Without SP the input is replicated and only the backward needs an all-reduce; with SP the
    sequence slices are all-gathered and the backward reduce-scatters.
    """
    if ctx.tp_size == 1:
        return x
    if ctx.sequence_parallel:
        return mappings.gather_from_sequence(x, ctx.tp_group, grad_is_partial=True)
    return copy_to_tensor_parallel(x, ctx)


def copy_to_tensor_parallel(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Replicated input to a TP-sharded consumer: identity forward, all-reduce backward."""
    if ctx.tp_size == 1:
        return x
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=ctx.tp_group)


def row_parallel_forward(layer: nn.Module, x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Run a RowParallelLinear: all-reduce the partial sums, or reduce-scatter them under SP."""
    out, bias = layer(x)
    if not layer.partial_output:  # the layer reduced and added the bias
        return out
    out = mappings.reduce_scatter_to_sequence(out, ctx.tp_group)
    return out if bias is None else out + sequence_parallel_param(layer, "bias", ctx)


def share_parameter(user: nn.Module, param: nn.Parameter) -> None:
    """Declare that `user`'s forward reads `param` of another module (a tied weight): ZeRO-3
    must gather it for that forward too. Without ZeRO-3 this only records the fact."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(user, param)


def sequence_parallel_param(module: nn.Module, name: str, ctx: ParallelContext) -> torch.Tensor:
    """`module`'s replicated parameter `name`, applied to a sequence slice: its gradient is
    summed over TP. Inside `sequence_parallel_grad_bucket` that sum is the bucket's one
    all-reduce; elsewhere (ZeRO-3, a module run on its own) an all-reduce of its own."""
    p = getattr(module, name)
    if not (ctx.sequence_parallel and ctx.tp_size > 1):
        return p
    view = module.__dict__.get("_grad_views", {}).get(name)
    if view is not None and torch.is_grad_enabled():
        return view
    return mappings.all_reduce_grad(p, ctx.tp_group)


def sequence_parallel_grad_bucket(model: nn.Module, ctx: ParallelContext) -> contextlib.AbstractContextManager:
    """Run a forward of `model` in which the replicated parameters applied to sequence slices
    (LayerNorms, row-parallel biases: 6 per BERT layer) have their TP gradient sums done in one
    all-reduce after their backward, as Megatron does, instead of one tiny collective each.

    Under ZeRO-3 the parameters are only whole inside their own module's forward, so each
    keeps its own all-reduce there (and the forward runs with no bucket at all)."""
    if not (ctx.sequence_parallel and ctx.tp_size > 1 and torch.is_grad_enabled()):
        return contextlib.nullcontext()
    # Read through `_parameters.items()`: under ZeRO-3 a parameter looked up by name outside its
    # module's forward is gathered, and its partitioning bookkeeping goes wrong from there.
    params = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()
              if n in getattr(m, "sequence_parallel_params", ()) and p is not None and p.requires_grad]
    if not params or any(hasattr(p, "ds_id") for _, _, p in params):
        return contextlib.nullcontext()
    return _bucketed([(m, n) for m, n, _ in params], ctx)


@contextlib.contextmanager
def _bucketed(users: list[tuple[nn.Module, str]], ctx: ParallelContext) -> Iterator[None]:
    views = mappings.all_reduce_grads_bucketed([getattr(m, n) for m, n in users], ctx.tp_group)
    for (m, n), view in zip(users, views):
        m.__dict__.setdefault("_grad_views", {})[n] = view
    try:
        yield
    finally:  # a view belongs to this forward's graph only
        for m, n in users:
            m.__dict__["_grad_views"].pop(n, None)


def leave_to_replicated(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Full-sequence activations on every TP rank (for replicated consumers such as the head)."""
    if ctx.sequence_parallel and ctx.tp_size > 1:
        return mappings.gather_from_sequence(x, ctx.tp_group, grad_is_partial=False)
    return x


def split_to_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Replicated [b, s, h] -> this rank's sequence slice (identity without SP)."""
    if ctx.sequence_parallel and ctx.tp_size > 1:
        return mappings.scatter_to_sequence(x, ctx.tp_group)
    return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
              dropout_p: float, ctx: ParallelContext) -> torch.Tensor:
    """`scaled_dot_product_attention` over this rank's heads (`mask`: True = may attend), or
    FlexAttention when `mask` is a block mask.

    Each TP rank owns different heads, so their attention-dropout masks must differ: the
    dropout draws from the sharded stream. The fused kernels draw inside themselves, which a
    compiled graph cannot redirect, so a compiled layer at TP > 1 with attention dropout runs
    the attention as matmuls, softmax and a sharded dropout mask (`sharded_ops`) instead.
    """
    if isinstance(mask, BlockMask):  # chosen only without dropout (kernels.use_flex_attention)
        return kernels.flex_attention(q, k, v, mask)
    if dropout_p == 0.0 or ctx.tp_size == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if torch.compiler.is_compiling():
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        probs = probs * sharded_ops.sharded_dropout_mask(probs.detach(), dropout_p)
        return torch.matmul(probs, v)
    with SHARDED_RNG.fork(ctx.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class ParallelLayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters' gradients are summed over TP when it sees a sequence slice."""

    def __init__(self, hidden: int, eps: float, ctx: ParallelContext, bias: bool = True) -> None:
        super().__init__(hidden, eps=eps, bias=bias)
        self.ctx = ctx
        if ctx.sequence_parallel and ctx.tp_size > 1:
            self.sequence_parallel_params = ("weight", "bias") if bias else ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else sequence_parallel_param(self, "bias", self.ctx)
        return F.layer_norm(
            x, self.normalized_shape, sequence_parallel_param(self, "weight", self.ctx), bias, self.eps,
        )


class ParallelDropout(nn.Dropout):
    """Dropout on activations that are sequence slices under SP (then each rank needs its own
    mask) and replicated otherwise (then every TP rank must draw the same mask)."""

    def __init__(self, p: float, ctx: ParallelContext) -> None:
        super().__init__(p)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not (self.ctx.sequence_parallel and self.ctx.tp_size > 1):
            return F.dropout(x, self.p, True)
        if torch.compiler.is_compiling():
            return x * sharded_ops.sharded_dropout_mask(x.detach(), self.p)
        with SHARDED_RNG.fork(self.ctx.device):
            return F.dropout(x, self.p, True)
