"""Sequence-parallel communication as autograd functions, on any device and backend.

megatron-core's sequence-parallel mappings allocate their buffers on CUDA, so they cannot run
under gloo on CPU. These do the same collectives with torch.distributed's tensor collectives,
splitting along the *sequence* dimension (dim 1 of our [batch, seq, hidden] activations).
The tensor-parallel (non-sequence) mappings come from megatron-core and work everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


# torch >= 2.10 renamed the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[world, *x.shape]: every rank's `x`, stacked in rank order."""
    world = _world(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x.contiguous(), group=group)
    return out.view((world,) + tuple(x.shape))


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    # Collectives want a contiguous leading dim: gather [world, b, s_local, ...] then move it.
    out = all_gather_stacked(x, group).movedim(0, 1)  # [b, world, s_local, ...]
    return out.reshape(x.shape[0], world * x.shape[1], *x.shape[2:])


def _reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    b, s = x.shape[0], x.shape[1]
    if s % world:
        raise ValueError(f"sequence length {s} is not divisible by the TP size {world}")
    chunks = x.reshape(b, world, s // world, *x.shape[2:]).movedim(1, 0).contiguous()
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_flat(out, chunks.view((world * b,) + tuple(chunks.shape[2:])), group=group)
    return out


def _split_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    s = x.shape[1]
    if s % world:
        raise ValueError(f"sequence length {s} is not divisible by the TP size {world}")
    local = s // world
    r = _rank(group)
    return x[:, r * local : (r + 1) * local].contiguous()


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's sequence slice. Backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_seq(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter when the consumer is TP-sharded
    (each rank holds a partial gradient), plain split when it is replicated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, grad_is_partial: bool) -> torch.Tensor:
        ctx.group = group
        ctx.grad_is_partial = grad_is_partial
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.grad_is_partial:
            return _reduce_scatter_seq(grad, ctx.group), None, None
        return _split_seq(grad, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: sum partial outputs and keep this rank's slice. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_seq(grad, ctx.group), None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce the gradient. For parameters used on a sequence slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if _world(ctx.group) > 1:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Replicated [b, s, ...] -> this rank's [b, s/tp, ...] slice."""
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, grad_is_partial: bool = True
) -> torch.Tensor:
    """Slices [b, s/tp, ...] -> full [b, s, ...] on every rank of `group`."""
    return _GatherFromSequence.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Partial sums [b, s, ...] -> the summed [b, s/tp, ...] slice of this rank."""
    return _ReduceScatterToSequence.apply(x, group)


def all_reduce_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity whose backward sums the gradient over `group`."""
    return _AllReduceGrad.apply(x, group)
