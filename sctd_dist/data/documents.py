"""Document boundaries inside packed rows, for attention within documents.

`packing.SequencePacker` ends every document segment of a row with [SEP] (and never puts [SEP]
anywhere else; masking never replaces it), so the boundaries are exactly the [SEP] positions.
Prepared folders record this as `"document_boundaries": "sep"` in their metadata; older folders,
packed the same way, get the same derivation.
"""

from __future__ import annotations

import numpy as np

BOUNDARY_RECORD = "sep"  # metadata["document_boundaries"]: boundaries are the [SEP] tokens


def document_ids(rows: np.ndarray, sep_id: int) -> np.ndarray:
    """Document index of every token of rows [b, T]: the number of [SEP]s before it ([CLS] is
    in the first document, each [SEP] in the document it closes, padding after the last)."""
    is_sep = (rows == sep_id).astype(np.int64)
    return np.cumsum(is_sep, axis=1) - is_sep
