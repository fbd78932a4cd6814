"""PackedDataset and the tokenizer that travels with the shards."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from sctd_dist.data.dataset import PackedDataset, load_tokenizer, read_metadata
from tests.data.conftest import SEQ


def test_rows_and_metadata(prepared) -> None:
    ds = PackedDataset(prepared)
    meta = read_metadata(prepared)
    assert len(ds) == meta["splits"]["train"]["num_sequences"] > 100
    assert ds.seq_length == SEQ and ds.metadata["seq_length"] == SEQ
    row = ds[5]
    assert row.dtype == np.int64 and row.shape == (SEQ,)
    assert row[0] == ds.special_ids.cls
    np.testing.assert_array_equal(ds[-1], ds[len(ds) - 1])
    idx = np.array([len(ds) - 1, 0, 17, 17, 3])  # any order, repeats, across shards
    np.testing.assert_array_equal(ds.get_rows(idx), np.stack([ds[int(i)] for i in idx]))
    # rows come straight from the shard files, in shard order
    first = meta["splits"]["train"]["shards"][0]
    raw = np.fromfile(prepared / first["file"], dtype=meta["dtype"]).reshape(-1, SEQ)
    np.testing.assert_array_equal(ds.get_rows(np.arange(len(raw))), raw.astype(np.int64))
    with pytest.raises(IndexError):
        ds[len(ds)]
    val = PackedDataset(prepared, "validation")
    assert len(val) == meta["splits"]["validation"]["num_sequences"] > 0
    with pytest.raises(ValueError, match="split"):
        PackedDataset(prepared, "test")


def test_pickles_for_worker_processes(prepared) -> None:
    ds = PackedDataset(prepared)
    ds[0]  # opens the maps
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.get_rows(np.arange(10)), ds.get_rows(np.arange(10)))


def test_tokenizer_travels_with_the_data(prepared, hf_tokenizer) -> None:
    tok = load_tokenizer(prepared)
    assert len(tok) == len(hf_tokenizer) == read_metadata(prepared)["vocab_size"]
    assert tok.get_vocab() == hf_tokenizer.get_vocab()
    ids = PackedDataset(prepared).special_ids
    assert (ids.cls, ids.sep, ids.mask, ids.pad, ids.unk) == (
        tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, tok.unk_token_id)


def test_incomplete_folders_are_refused(tmp_path, prepared) -> None:
    with pytest.raises(ValueError, match="sctd_dist.data.prepare"):
        PackedDataset(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / read_metadata(copy)["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        PackedDataset(copy)
