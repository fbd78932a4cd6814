"""Row packing invariants and the hashed document split, on synthetic documents."""

from __future__ import annotations

import numpy as np
import pytest

from sctd_dist.data.packing import SequencePacker, is_validation_document, token_dtype
from tests.data.helpers import assert_row_layout, strip_specials

CLS, SEP, PAD = 2, 3, 0
SEQ = 16  # body of 14 tokens


def _docs(lengths: list[int], start: int = 10) -> list[np.ndarray]:
    docs, nxt = [], start
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n))
        nxt += n
    return docs


@pytest.mark.parametrize("lengths", [
    [1], [14], [13], [12], [15], [50], [0, 5, 0, 0, 7], [12, 1, 13, 14, 28, 2, 11, 1, 1, 1, 40],
    list(np.random.default_rng(0).integers(0, 40, size=200)),
])
def test_no_token_lost_or_duplicated(lengths: list[int]) -> None:
    packer = SequencePacker(SEQ, cls_id=CLS, sep_id=SEP, pad_id=PAD, dtype=np.int32)
    docs = _docs(lengths)
    for d in docs:
        packer.add(d)
    rows = packer.finish()
    assert rows.shape[1] == SEQ
    assert_row_layout(rows, CLS, SEP, PAD)
    np.testing.assert_array_equal(strip_specials(rows, CLS, SEP, PAD), np.concatenate(docs))
    n_docs = sum(1 for n in lengths if n)
    assert packer.num_documents == n_docs and packer.num_tokens == sum(lengths)
    assert packer.num_padding == int((rows == PAD).sum())
    # every document boundary that falls inside a row is marked by exactly one [SEP]
    assert packer.num_separators == int((rows[:, 1:] == SEP).sum()) - rows.shape[0]
    assert packer.num_separators <= max(0, n_docs - 1)


def test_rows_are_full_except_rare_one_slot_gaps_and_the_last() -> None:
    packer = SequencePacker(SEQ, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    for d in _docs(list(np.random.default_rng(1).integers(1, 30, size=300))):
        packer.add(d)
    rows = packer.finish()
    pads = (rows == PAD).sum(1)
    assert np.all(pads[:-1] <= 1)  # a gap of one slot instead of "[SEP] [SEP]"
    assert pads[:-1].mean() < 0.1


def test_dtype_choice_and_bounds() -> None:
    assert token_dtype(30522) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    with pytest.raises(ValueError, match="too short"):
        SequencePacker(4, cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_validation_split_is_a_pure_hash() -> None:
    idx = np.arange(200_000)
    mask = is_validation_document(idx, 0.05, seed=3)
    assert abs(mask.mean() - 0.05) < 0.003
    np.testing.assert_array_equal(mask[1234:5678], is_validation_document(idx[1234:5678], 0.05, seed=3))
    assert (mask != is_validation_document(idx, 0.05, seed=4)).any()
    assert not is_validation_document(idx, 0.0, seed=3).any()
    with pytest.raises(ValueError, match="validation fraction"):
        is_validation_document(idx, 1.0, seed=3)
