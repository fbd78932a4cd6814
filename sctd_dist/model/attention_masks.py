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
"""

from __future__ import annotations

from typing import NamedTuple

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


def attention_mask(queries: TokenRows, keys: TokenRows, window: int | None = None) -> torch.Tensor:
    """[b, 1, n_q, n_k] bool, True = may attend (the rule of the module docstring); `window`:
    the largest allowed distance in original positions (None: no window)."""
    allowed = keys.real[:, None, :].expand(-1, queries.real.shape[1], -1)
    if queries.documents is not None:
        allowed = allowed & (queries.documents[:, :, None] == keys.documents[:, None, :])
    distance = queries.positions[:, :, None] - keys.positions[:, None, :]
    if window is not None:
        allowed = allowed & (distance.abs() <= window)
    return (allowed | (distance == 0))[:, None]


class PhaseMasks(NamedTuple):
    """Masks of the three shapes a token-dropping forward needs (None: attend everywhere)."""

    full: torch.Tensor | None  # all queries x all keys
    split: torch.Tensor | None  # kept queries x all keys
    kept: torch.Tensor | None  # kept queries x kept keys


def phase_masks(rows: TokenRows, routing: Routing | None, window: int | None = None) -> PhaseMasks:
    """The masks of every phase for `rows` (all tokens) and the kept tokens of `routing`."""
    full = attention_mask(rows, rows, window)
    if routing is None:
        return PhaseMasks(full, None, None)
    kept = rows.gather(routing.kept)
    return PhaseMasks(full, attention_mask(kept, rows, window), attention_mask(kept, kept, window))


def document_ids(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Document index of every token of packed rows [b, T]: a row's segments end at its [SEP]
    tokens (`sctd_dist.data.packing`: [SEP] marks every document boundary inside a row and
    closes the row), so a token's document is the number of [SEP]s before it. [CLS] belongs to
    the first document, each [SEP] to the document it closes."""
    is_sep = (input_ids == sep_id).long()
    return torch.cumsum(is_sep, dim=1) - is_sep
