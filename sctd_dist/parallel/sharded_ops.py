"""A custom op that draws dropout masks from the TP-sharded RNG stream inside compiled code.

Work that differs between TP ranks (attention-probability dropout over this rank's heads, and
under sequence parallelism the hidden dropout of this rank's slice) draws from the sharded
stream (`sctd_dist.parallel.random`). Eager code swaps the generator state around those ops;
a compiled graph cannot (dynamo breaks the graph at every RNG-state getter and setter, because
AOT autograd would drop them). This op does the swap inside one opaque graph node that only
makes the mask, so the layer stays one graph and the multiply stays differentiable and fusable;
the replicated dropouts stay in the graph on the default stream.
"""

from __future__ import annotations

import torch

from sctd_dist.parallel.random import SHARDED_RNG


@torch.library.custom_op("sctd::sharded_dropout_mask", mutates_args=())
def sharded_dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted-dropout multiplier shaped like `like` (0 or 1/(1-p)) from the sharded stream:
    `x * mask` is `F.dropout(x, p)` with the draws that eager code makes under the fork."""
    with SHARDED_RNG.fork(like.device):
        return torch.empty_like(like).bernoulli_(1.0 - p).div_(1.0 - p)


@sharded_dropout_mask.register_fake
def _(like: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(like)
