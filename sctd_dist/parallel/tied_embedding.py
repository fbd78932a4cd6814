"""The gradient of the word embeddings tied to the MLM decoder, built without a second V x h buffer.

The decoder GEMM's weight gradient is a dense V x h matrix whatever we do. The lookup's gradient
only touches the rows of the ids that occur, but autograd's embedding backward zero-fills a
dense V x h matrix for them, and the two are then summed (a further pass over V x h; with
PyTorch's sparse embedding gradient the sum is still done out of place, copying V x h).

Here the two uses of the weight in one forward pass share a `TiedGradient`: the decoder's
backward hands its dense gradient over instead of returning it, and the lookup's backward, which
always runs after it (the decoder's input depends on the lookup's output), adds the looked-up
rows into it with `index_add_` and returns the sum as the weight's only gradient. Optimizers,
DeepSpeed and ZeRO see one ordinary dense gradient. A pass whose decoder does not reach the loss
leaves its rows as a sparse gradient, which autograd adds to the other uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedGradient:
    """One forward pass's decoder gradient, waiting for the lookup's rows."""

    __slots__ = ("dense",)

    def __init__(self) -> None:
        self.dense: torch.Tensor | None = None


class TiedWeight:
    """Shared by the embedding module and the decoder: each lookup starts a pass (`current`),
    the decoder that follows joins it. (A module whose `tied` is None gets plain autograd
    gradients.)"""

    def __init__(self) -> None:
        self.current: TiedGradient | None = None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, slot: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.slot = slot
        ctx.weight_shape = weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        index = ids.reshape(-1)
        dense, ctx.slot.dense = ctx.slot.dense, None
        if dense is None:
            # No decoder gradient in this pass (e.g. a consistency pass without MLM head): the
            # rows alone, as a sparse gradient autograd adds into the dense one. Ids index the
            # table, so the invariant check would only cost time.
            return None, torch.sparse_coo_tensor(index.unsqueeze(0), rows, ctx.weight_shape,
                                                 check_invariants=False), None
        return None, dense.index_add_(0, index, rows.to(dense.dtype)), None


def hand_over(slot: TiedGradient | None, grad_weight: torch.Tensor) -> torch.Tensor | None:
    """What a decoder's backward returns as its weight's gradient: None when the pass's lookup
    will return it (added into `slot`), else `grad_weight` itself (no tied pass: plain autograd).
    `grad_weight` must be a fresh buffer the caller owns."""
    if slot is None:
        return grad_weight
    slot.dense = grad_weight if slot.dense is None else slot.dense.add_(grad_weight)
    return None


def decoder_slot(tied: TiedWeight | None) -> TiedGradient | None:
    """The pass a decoder reading the tied weight joins (None: its gradient is its own)."""
    if tied is None or not torch.is_grad_enabled():
        return None
    return tied.current


def lookup(ids: torch.Tensor, weight: torch.Tensor, tied: TiedWeight | None) -> torch.Tensor:
    """`F.embedding(ids, weight)`, starting a pass of `tied` whose gradient is assembled as
    described above (plain autograd when `tied` is None or when no gradient is recorded)."""
    if tied is None:
        return F.embedding(ids, weight)
    active = torch.is_grad_enabled() and weight.requires_grad
    tied.current = TiedGradient() if active else None  # never a stale pass for the decoder
    if tied.current is None:
        return F.embedding(ids, weight)
    return _Lookup.apply(ids, weight, tied.current)
