"""Reading a prepared data folder: packed rows, metadata, tokenizer, compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sctd_dist.special_tokens import SpecialTokenIds

from .tokenizer import load_pretrained_tokenizer, tokenizer_fingerprint

FORMAT = "sctd-dist-packed"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")


def read_metadata(data_dir: str | Path) -> dict:
    """The metadata of a complete prepared folder; ValueError saying how to make one otherwise."""
    path = Path(data_dir).expanduser() / METADATA_FILE
    if not path.is_file():
        raise ValueError(
            f"{Path(data_dir)} holds no prepared data ({METADATA_FILE} missing; an interrupted run "
            "leaves none). Run: python -m sctd_dist.data.prepare --input ... --out "
            f"{Path(data_dir)} --seq-length N (--tokenizer DIR | --train-tokenizer VOCAB)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); prepare {Path(data_dir)} again") from None
    if not isinstance(meta, dict):
        meta = {"format": type(meta).__name__}
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not {FORMAT} version {FORMAT_VERSION} data "
                         f"(found {meta.get('format')} {meta.get('version')}); prepare it again")
    return meta


class PackedDataset:
    """Fixed-length packed rows of one split, memory-mapped from the shard files.

    `dataset[i]` is an int64 array of `seq_length` token ids ([CLS] ... [SEP], maybe [PAD]s);
    `get_rows(indices)` reads many rows at once. Picklable (maps are reopened lazily).
    """

    def __init__(self, data_dir: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self.metadata = read_metadata(self.data_dir)
        try:
            self.seq_length = int(self.metadata["seq_length"])
            self.dtype = np.dtype(self.metadata["dtype"])
            self.vocab_size = int(self.metadata["vocab_size"])
            self.special_ids = SpecialTokenIds.from_dict(self.metadata["tokenizer"]["special_ids"])
            shards = self.metadata["splits"][split]["shards"]
            self._files = [self.data_dir / s["file"] for s in shards]
            counts = np.array([s["num_sequences"] for s in shards], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.data_dir / METADATA_FILE} is damaged ({type(exc).__name__}: {exc}); "
                             f"prepare {self.data_dir} again") from None
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        row_bytes = self.seq_length * self.dtype.itemsize
        for f, n in zip(self._files, counts):
            if not f.is_file() or f.stat().st_size != n * row_bytes:
                raise ValueError(f"shard {f} is missing or truncated (expected {n} rows of {row_bytes} "
                                 f"bytes); prepare {self.data_dir} again")
        self._maps: list[np.memmap] | None = None

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / self.metadata["tokenizer"]["dir"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r", shape=(int(n), self.seq_length))
                          for f, n in zip(self._files, np.diff(self._starts))]
        return self._maps

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for {n} rows ({self.split})")
        return self.get_rows(np.array([i]))[0]

    def get_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (any order, repeats allowed) as an int64 array [len(indices), seq_length]."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)})")
        out = np.empty((idx.size, self.seq_length), dtype=np.int64)
        maps = self._open()
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            out[sel] = maps[s][idx[sel] - self._starts[s]]
        return out


def load_tokenizer(data_dir: str | Path) -> Any:
    """The fast transformers tokenizer saved with a prepared folder, checked against its metadata."""
    meta = read_metadata(data_dir)
    tok_dir = Path(data_dir).expanduser() / meta["tokenizer"]["dir"]
    tok = load_pretrained_tokenizer(tok_dir, local_only=True)
    if len(tok) != meta["vocab_size"]:
        raise ValueError(f"tokenizer in {tok_dir} has {len(tok)} tokens, the data {meta['vocab_size']}; "
                         "the folder was modified: prepare it again")
    if tokenizer_fingerprint(tok) != meta["tokenizer"]["fingerprint"]:
        raise ValueError(f"tokenizer in {tok_dir} is not the one the shards were made with; prepare again")
    return tok
