"""The MLM decoder tied to the vocabulary-parallel token embeddings: this rank's shard of the
decoder bias, the padded vocabulary's exclusion, and the fused decoder + cross-entropy call.
Shared by the BERT and ModernBERT heads (each keeps its own module names)."""

from __future__ import annotations

import torch
from torch import nn

from sctd_dist.parallel import layers as tp
from sctd_dist.parallel.state import ParallelContext

# Added to the logits of padded vocabulary entries: they never win the softmax or the maximum
# (probability exp(-1e4) = 0), and the value fits fp16 and bf16 without overflow.
PADDED_VOCAB_LOGIT = -1e4


def add_vocab_bias(module: nn.Module, cfg, ctx: ParallelContext) -> None:
    """Give `module` this rank's vocab-sharded `bias` parameter, its `padding_bias` buffer,
    `vocab_start` and the `tied` slot (the embeddings' TiedWeight, set by the model that ties
    them)."""
    module.tied = None
    shard = cfg.padded_vocab_size(ctx.tp_size) // ctx.tp_size
    module.vocab_start = ctx.tp_rank * shard
    module.bias = nn.Parameter(torch.zeros(shard))
    tp.mark_tensor_parallel(module.bias)
    # Why a bias and not a masked_fill of the logits: folded into the GEMM's bias add, the
    # exclusion costs nothing, where a fill pass over [n, V] logits cost ~10% of a small step.
    padded = torch.arange(module.vocab_start, module.vocab_start + shard) >= cfg.vocab_size
    module.register_buffer("padding_bias", padded.float() * PADDED_VOCAB_LOGIT, persistent=False)


def tied_decode(module: nn.Module, h: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [n] fp32, number correct) of replicated rows h [n, hidden] through the
    decoder `weight` and `module`'s bias (see `add_vocab_bias`)."""
    bias = module.bias + module.padding_bias.to(module.bias.dtype)
    return tp.tied_decoder_cross_entropy(h, weight, bias, targets, module.vocab_start, module.tied, module.ctx)
