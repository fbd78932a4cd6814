"""Document boundaries inside packed rows, for attention within documents: the one rule shared
by the data (whose loader hands each micro-batch's document ids to the model) and the model
(which derives them from [SEP] when a batch carries none).

`data.packing.SequencePacker` ends every document segment of a row with [SEP] (and never puts
[SEP] anywhere else; masking never replaces it), so the boundaries are exactly the [SEP]
positions. Prepared folders record this as `"document_boundaries": "sep"` in their metadata;
older folders, packed the same way, get the same derivation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tensors come in; preparation, which imports BOUNDARY_RECORD, needs no torch
    import torch

BOUNDARY_RECORD = "sep"  # metadata["document_boundaries"]: boundaries are the [SEP] tokens


def document_ids(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Document index of every token of rows [b, T] (int64): the number of [SEP]s before it
    ([CLS] is in the first document, each [SEP] in the document it closes, padding after the
    last)."""
    is_sep = (input_ids == sep_id).long()
    return is_sep.cumsum(dim=1) - is_sep
