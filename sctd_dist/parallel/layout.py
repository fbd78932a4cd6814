"""How the BERT's parameters are laid out over tensor-parallel ranks.

One description serves every tool that moves weights between TP sizes: the Hugging Face
import/export (`sctd_dist.hf`) and checkpoint resharding (`sctd_dist.reshard`). A parameter is
either split along one dimension (column-parallel: output rows; row-parallel: input columns;
the vocabulary-parallel embedding and MLM bias: vocabulary rows) or replicated on every TP rank
(LayerNorms, position and token-type embeddings, row-parallel biases, the head transform).
The decoder weight is tied to the word embeddings and is not a parameter of its own.

Names are matched at their end, so they work with or without a wrapper prefix (`mlm.` inside
the DeepSpeed engine).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

# Split along the output dimension (ColumnParallelLinear): weight rows and bias.
_COLUMN = re.compile(r"attention\.self\.(query|key|value)\.(weight|bias)$|intermediate\.dense\.(weight|bias)$"
                     r"|(attn\.Wqkv|mlp\.Wi)\.weight$")
# Split along the input dimension (RowParallelLinear): weight columns; the bias is replicated.
_ROW = re.compile(r"(attention\.output\.dense|layer\.\d+\.output\.dense|attn\.Wo|mlp\.Wo)\.weight$")
# Split along the vocabulary, padded to a multiple of 128 x TP rows (the padding differs by TP size).
_VOCAB = re.compile(r"(^|\.)(bert\.embeddings\.word_embeddings\.weight|cls\.predictions\.bias"
                    r"|model\.embeddings\.tok_embeddings\.weight|decoder\.bias)$")
# Fused column-parallel outputs (ModernBERT's Q|K|V and GLU input|gate): each TP rank holds its
# slice of every block, so the tensor is split per block, not in one piece.
_FUSED_BLOCKS = ((re.compile(r"attn\.Wqkv\.weight$"), 3), (re.compile(r"mlp\.Wi\.weight$"), 2))


def fused_blocks(name: str) -> int:
    """How many blocks a column-parallel output is fused from (1: not fused)."""
    return next((n for pattern, n in _FUSED_BLOCKS if pattern.search(name)), 1)


def is_vocab(name: str) -> bool:
    """True for the tensors with one row per (padded) vocabulary entry."""
    return _VOCAB.search(name) is not None


def shard_dim(name: str) -> int | None:
    """The dimension along which parameter `name` is split over TP ranks (None: replicated)."""
    if is_vocab(name) or _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (padded entries never train: their logits are
    pushed to -1e4, so their gradients are exactly zero)."""
    if t.shape[0] == rows:
        return t
    pad = torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def split(t: torch.Tensor, name: str, tp_size: int, tp_rank: int, padded_vocab: int) -> torch.Tensor:
    """TP rank `tp_rank`'s part of the whole (vocabulary-unpadded) tensor `t`."""
    if is_vocab(name):
        t = pad_vocab(t, padded_vocab)
    dim = shard_dim(name)
    if dim is None or tp_size == 1:
        return t
    blocks = fused_blocks(name)
    if blocks > 1:
        per_block = t.reshape(blocks, -1, *t.shape[1:])
        return per_block.chunk(tp_size, dim=1)[tp_rank].reshape(-1, *t.shape[1:])
    return t.chunk(tp_size, dim=dim)[tp_rank]


def merge(shards: Sequence[torch.Tensor], name: str, vocab_size: int) -> torch.Tensor:
    """The whole tensor from rank-ordered TP shards, vocabulary padding removed.

    Replicated tensors are taken from TP rank 0 (every rank holds the same values)."""
    dim = shard_dim(name)
    blocks = fused_blocks(name)
    if blocks > 1 and len(shards) > 1:
        rest = shards[0].shape[1:]
        per_block = [s.reshape(blocks, -1, *rest) for s in shards]
        return torch.cat(per_block, dim=1).reshape(-1, *rest)
    t = torch.cat(list(shards), dim=dim) if dim is not None and len(shards) > 1 else shards[0]
    return t[:vocab_size] if is_vocab(name) else t
