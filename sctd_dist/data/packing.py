"""Packing tokenized documents into fixed-length BERT rows, and the document-level split.

Row layout (no next-sentence prediction, documents run on across rows)::

    [CLS] d1 d1 d1 [SEP] d2 d2 ... d2 [SEP]        <- a document boundary inside a row: [SEP]
    [CLS] d2 d2 [SEP] d3 d3 d3 d3 d3 d3 d3 [SEP]   <- d2 continues from the previous row
    [CLS] d3 d3 d3 [SEP] [PAD] [PAD] ... [PAD]      <- only the last row of a shard is padded

Every row starts with [CLS] and its last real token is [SEP]; a [SEP] never follows [CLS] or
another [SEP]. Removing [CLS], [SEP] and [PAD] from the rows gives back the concatenated token
ids of the documents, in order: nothing is lost, nothing repeated. (When only one slot is left
before a document boundary, that row is closed with one [PAD] rather than with "[SEP] [SEP]".)
"""

from __future__ import annotations

import numpy as np

from .rng import DOMAIN_VALIDATION, derive_key, hash_uniform

MIN_SEQ_LENGTH = 8


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


class SequencePacker:
    """Accumulates documents (arrays of token ids) into rows of `seq_length` tokens."""

    def __init__(self, seq_length: int, *, cls_id: int, sep_id: int, pad_id: int,
                 dtype: np.dtype | type = np.int32, block_rows: int = 4096):
        if seq_length < MIN_SEQ_LENGTH:
            raise ValueError(f"sequence length {seq_length} is too short; use at least {MIN_SEQ_LENGTH}")
        self.seq_length = seq_length
        self._body = seq_length - 2  # room between [CLS] and the closing [SEP]
        self._cls, self._sep, self._pad = cls_id, sep_id, pad_id
        self._dtype = np.dtype(dtype)
        self._block_rows = block_rows
        self._blocks: list[np.ndarray] = []
        self._block = self._new_block()
        self._row = 0  # row being filled, inside self._block
        self._fill = 0  # body tokens already in that row
        self.num_documents = 0
        self.num_tokens = 0  # document tokens (no [CLS]/[SEP]/[PAD])
        self.num_rows = 0
        self.num_separators = 0  # [SEP]s between documents inside a row

    def _new_block(self) -> np.ndarray:
        return np.full((self._block_rows, self.seq_length), self._pad, dtype=self._dtype)

    def _close_row(self) -> None:
        row = self._block[self._row]
        row[0] = self._cls
        row[1 + self._fill] = self._sep
        self._row += 1
        self.num_rows += 1
        self._fill = 0
        if self._row == self._block_rows:
            self._blocks.append(self._block)
            self._block = self._new_block()
            self._row = 0

    def add(self, token_ids: np.ndarray) -> None:
        """Append one document (its token ids, without special tokens)."""
        n = len(token_ids)
        if n == 0:
            return  # an empty document leaves no trace, not even a separator
        self.num_documents += 1
        self.num_tokens += n
        if self._fill:
            if self._fill <= self._body - 2:  # room for [SEP] and at least one token
                self._block[self._row, 1 + self._fill] = self._sep
                self._fill += 1
                self.num_separators += 1
            else:
                self._close_row()
        i = 0
        while i < n:
            if self._fill == self._body:
                self._close_row()
            take = min(self._body - self._fill, n - i)
            start = 1 + self._fill
            self._block[self._row, start:start + take] = token_ids[i:i + take]
            self._fill += take
            i += take

    @property
    def num_padding(self) -> int:
        """[PAD] slots in the rows closed so far."""
        return self.num_rows * self.seq_length - self.num_tokens - self.num_separators - 2 * self.num_rows

    def finish(self) -> np.ndarray:
        """All rows, shape [num_rows, seq_length]; the packer is empty afterwards."""
        if self._fill:
            self._close_row()
        rows = self._blocks + [self._block[: self._row]]
        out = np.concatenate(rows) if len(rows) > 1 else rows[0].copy()
        self._blocks, self._block, self._row = [], self._new_block(), 0
        return out


def is_validation_document(doc_indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool per global document index: True if it belongs to the held-out validation split.

    Each document is drawn independently (probability `fraction`) from a hash of (seed, index),
    so any worker can decide for its own documents without coordination.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    idx = np.asarray(doc_indices, dtype=np.int64)
    if fraction == 0.0:
        return np.zeros(idx.shape, dtype=bool)
    key = derive_key(DOMAIN_VALIDATION, seed)[0]
    return hash_uniform(key, idx) < fraction
