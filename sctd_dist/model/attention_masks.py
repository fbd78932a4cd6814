"""Which keys each query may attend to, for every phase of the token-dropping schedule.

A set of token rows (all tokens, or the kept ones) is described by a `TokenRows`: the rows'
ORIGINAL positions in the sequence, whether each is real (not padding) and, with attention
within documents, the document each belongs to. A mask between query rows and key rows is then
one elementwise rule, so kept tokens keep their original distances (sliding window) and their
documents whatever the gather did to their order:

    allowed(q, k) = real(k) and doc(q) == doc(k) and |pos(q) - pos(k)| <= window
                    or q and k are the same token (a padding query attends to itself, so no
                    attention row is empty)

Both architectures use it: BERT's layers take the [b, 1, q, k] mask as they take a key mask.
On a GPU, ModernBERT's layers take the same rule as a FlexAttention block mask instead
(`block_mask`): the kernel skips the blocks the sliding window and the document boundaries
leave empty, where SDPA with a dense mask computes every score and falls back from its
FlashAttention kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from sctd_dist.model.router import Routing


class TokenRows(NamedTuple):
    """Original positions [b, n] (int64), real-token flags [b, n] (bool) and document ids
    [b, n] (None: one document per row) of a set of token rows."""

    positions: torch.Tensor
    real: torch.Tensor
    documents: torch.Tensor | None

    def gather(self, index: torch.Tensor) -> "TokenRows":
        """The rows at `index` [b, k] (e.g. the kept tokens), keeping their original positions."""
        docs = None if self.documents is None else torch.gather(self.documents, 1, index)
        return TokenRows(torch.gather(self.positions, 1, index), torch.gather(self.real, 1, index), docs)


def all_rows(real: torch.Tensor, documents: torch.Tensor | None) -> TokenRows:
    """Every token of [b, T] rows at positions 0..T-1."""
    b, t = real.shape
    positions = torch.arange(t, device=real.device).expand(b, t)
    return TokenRows(positions, real, documents)


def _allowed(q_pos: torch.Tensor, q_doc: torch.Tensor | None, k_pos: torch.Tensor, k_real: torch.Tensor,
             k_doc: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """The rule of the module docstring, elementwise: on broadcast [b, q, k] tensors for a
    dense mask, on the indexed entries for a FlexAttention `mask_mod`."""
    distance = q_pos - k_pos
    allowed = k_real
    if q_doc is not None:
        allowed = allowed & (q_doc == k_doc)
    if window is not None:
        allowed = allowed & (distance.abs() <= window)
    return allowed | (distance == 0)


def attention_mask(queries: TokenRows, keys: TokenRows, window: int | None = None) -> torch.Tensor:
    """[b, 1, n_q, n_k] bool, True = may attend (the rule of the module docstring); `window`:
    the largest allowed distance in original positions (None: no window)."""
    q_doc = None if queries.documents is None else queries.documents[:, :, None]
    k_doc = None if keys.documents is None else keys.documents[:, None, :]
    allowed = _allowed(queries.positions[:, :, None], q_doc, keys.positions[:, None, :],
                       keys.real[:, None, :], k_doc, window)
    return allowed[:, None]


def block_mask(queries: TokenRows, keys: TokenRows, window: int | None = None):
    """The same rule as `attention_mask`, as a FlexAttention BlockMask (heads broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        q_doc = None if queries.documents is None else queries.documents[b, q]
        k_doc = None if keys.documents is None else keys.documents[b, k]
        return _allowed(queries.positions[b, q], q_doc, keys.positions[b, k], keys.real[b, k], k_doc, window)

    b, n_q = queries.positions.shape
    return create_block_mask(mask_mod, b, None, n_q, keys.positions.shape[1], device=queries.positions.device)


class PhaseMasks(NamedTuple):
    """Masks of the three shapes a token-dropping forward needs (None: attend everywhere):
    dense bool tensors, or BlockMasks for FlexAttention."""

    full: Any  # all queries x all keys
    split: Any  # kept queries x all keys
    kept: Any  # kept queries x kept keys


def phase_masks(rows: TokenRows, routing: Routing | None, window: int | None = None,
                flex: bool = False) -> PhaseMasks:
    """The masks of every phase for `rows` (all tokens) and the kept tokens of `routing`;
    `flex`: as FlexAttention block masks."""
    make = block_mask if flex else attention_mask
    full = make(rows, rows, window)
    if routing is None:
        return PhaseMasks(full, None, None)
    kept = rows.gather(routing.kept)
    return PhaseMasks(full, make(kept, rows, window), make(kept, kept, window))

