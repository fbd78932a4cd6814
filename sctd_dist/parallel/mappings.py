"""Sequence-parallel communication as autograd functions, on any device and backend.

megatron-core's sequence-parallel mappings allocate their buffers on CUDA, so they cannot run
under gloo on CPU. These do the same collectives with torch.distributed's tensor collectives,
splitting along the *sequence* dimension (dim 1 of our [batch, seq, hidden] activations).
The tensor-parallel (non-sequence) mappings come from megatron-core and work everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sctd_dist.coordination import rank, world_size

# torch >= 2.10 renamed the flat-tensor collectives; older releases only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_stacked(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[world, *x.shape]: every rank's `x`, stacked in rank order."""
    world = world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x.contiguous(), group=group)
    return out.view((world,) + tuple(x.shape))


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = world_size(group)
    if world == 1:
        return x
    # Collectives want a contiguous leading dim: gather [world, b, s_local, ...] then move it.
    out = all_gather_stacked(x, group).movedim(0, 1)  # [b, world, s_local, ...]
    return out.reshape(x.shape[0], world * x.shape[1], *x.shape[2:])


def _reduce_scatter_seq(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = world_size(group)
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
    world = world_size(group)
    if world == 1:
        return x
    s = x.shape[1]
    if s % world:
        raise ValueError(f"sequence length {s} is not divisible by the TP size {world}")
    local = s // world
    r = rank(group)
    return x[:, r * local : (r + 1) * local].contiguous()


def _identity(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x.view_as(x)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if world_size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


class _Collective(torch.autograd.Function):
    """Forward `forward_fn(x, group)`; backward its adjoint `backward_fn(grad, group)`.

    Every sequence-parallel mapping is such a pair (split / all-gather, all-gather /
    reduce-scatter, identity / all-reduce), so one Function serves them all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, forward_fn, backward_fn) -> torch.Tensor:
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.backward_fn(grad, ctx.group), None, None, None


def scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Replicated [b, s, ...] -> this rank's [b, s/tp, ...] slice."""
    return _Collective.apply(x, group, _split_seq, _all_gather_seq)


def gather_from_sequence(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, grad_is_partial: bool = True
) -> torch.Tensor:
    """Slices [b, s/tp, ...] -> full [b, s, ...] on every rank of `group`. Backward:
    reduce-scatter when the consumer is TP-sharded (each rank holds a partial gradient), plain
    split when it is replicated."""
    backward = _reduce_scatter_seq if grad_is_partial else _split_seq
    return _Collective.apply(x, group, _all_gather_seq, backward)


def reduce_scatter_to_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Partial sums [b, s, ...] -> the summed [b, s/tp, ...] slice of this rank."""
    return _Collective.apply(x, group, _reduce_scatter_seq, _all_gather_seq)


def all_reduce_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity whose backward sums the gradient over `group`."""
    return _Collective.apply(x, group, _identity, _all_reduce)


class _BucketedAllReduceGrads(torch.autograd.Function):
    """Identity views of several tensors whose gradients are summed over `group` in one
    all-reduce per dtype. Autograd runs this backward once every view's gradient is complete,
    i.e. after the backward of the view's last user."""

    @staticmethod
    def forward(ctx, group, *params: torch.Tensor):
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        out = list(grads)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for index in by_dtype.values():
            flat = _all_reduce(torch.cat([grads[i].reshape(-1) for i in index]), ctx.group)
            for i, part in zip(index, flat.split([grads[i].numel() for i in index])):
                out[i] = part.view_as(grads[i])
        return (None, *out)


def all_reduce_grads_bucketed(params: list[torch.Tensor],
                              group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """Views of `params` for a forward to read: their gradients are summed over `group` by one
    all-reduce (per dtype) once backward has produced all of them, as Megatron all-reduces its
    sequence-parallel gradients in one bucket, instead of one collective per parameter."""
    return _BucketedAllReduceGrads.apply(group, *params)
