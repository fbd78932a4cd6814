"""Small reference helpers shared by the data tests (independent of the code under test)."""

from __future__ import annotations

import numpy as np


def reference_ids(hf_tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as transformers produces them (literal "[SEP]" etc. stay text)."""
    if not texts:
        return []
    return hf_tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def flat(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for d in docs for t in d], dtype=np.int64)


def strip_specials(rows: np.ndarray, cls: int, sep: int, pad: int) -> np.ndarray:
    """All ids of the rows, in order, minus [CLS], [SEP] and [PAD]."""
    r = np.asarray(rows).reshape(-1).astype(np.int64)
    return r[~np.isin(r, [cls, sep, pad])]


def assert_row_layout(rows: np.ndarray, cls: int, sep: int, pad: int) -> None:
    """[CLS] first, [SEP] as last real token, [PAD]s only at the end, no empty segments."""
    for row in np.asarray(rows):
        assert row[0] == cls
        real = np.flatnonzero(row != pad)
        assert real.size >= 3 and np.array_equal(real, np.arange(real.size)), "padding inside a row"
        assert row[real[-1]] == sep
        body = row[1:real[-1]]
        assert cls not in body
        seps = np.flatnonzero(body == sep)
        assert 0 not in seps, "[SEP] right after [CLS]"
        assert not np.any(np.diff(seps) == 1), "[SEP] [SEP]"
        assert body.size - 1 not in seps, "[SEP] [SEP] at the end of a row"
