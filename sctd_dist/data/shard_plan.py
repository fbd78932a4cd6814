"""Planning a preparation: the corpus cut into shards of contiguous documents.

Shards are about `SHARD_TARGET_BYTES` of text each (at least `MIN_PARALLEL_SHARDS` when the
corpus is big enough), never depending on the number of worker processes, so a re-run with
another --num-proc finds the same shards.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SHARD_TARGET_BYTES = 64 << 20  # text bytes per shard for large corpora
MIN_SHARD_BYTES = 256 << 10  # ... but never smaller than this
MIN_PARALLEL_SHARDS = 16  # ... and at least this many shards when the corpus allows it


@dataclass(frozen=True)
class ShardTask:
    """A contiguous range of documents of one source, packed into one output shard per split."""

    index: int
    source: int
    start: int
    stop: int
    doc_offset: int  # global index (over all sources) of document `start`
    text_bytes: int


def _text_lengths(dataset: Any) -> np.ndarray:
    """UTF-8 byte length of every document (0 for nulls), computed in Arrow without Python loops."""
    import pyarrow.compute as pc

    parts = [np.zeros(0, dtype=np.int64)]
    for batch in dataset.with_format("arrow").iter(batch_size=1 << 16):
        lengths = pc.fill_null(pc.binary_length(batch.column("text")), 0)
        parts.append(lengths.to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(parts)


def plan_shards(sources: list[Any], shard_bytes: int = SHARD_TARGET_BYTES) -> list[ShardTask]:
    """Cut every source into shards of about `shard_bytes` of text (see the module docstring)."""
    lengths = [_text_lengths(s.dataset) for s in sources]
    total = int(sum(int(x.sum()) for x in lengths))
    # Big corpora: `shard_bytes` per shard. Smaller ones: >= MIN_PARALLEL_SHARDS shards, but none
    # below MIN_SHARD_BYTES unless `shard_bytes` itself asks for less.
    target = max(1, min(shard_bytes, max(MIN_SHARD_BYTES, math.ceil(total / MIN_PARALLEL_SHARDS))))
    tasks: list[ShardTask] = []
    offset = 0
    for si, lens in enumerate(lengths):
        if len(lens) and lens.sum() > 0:
            cum = np.cumsum(lens)
            cuts = np.searchsorted(cum, np.arange(target, cum[-1], target), side="left") + 1
            bounds = np.unique(np.concatenate([[0], cuts, [len(lens)]]))
            for a, b in zip(bounds[:-1], bounds[1:]):
                tasks.append(ShardTask(len(tasks), si, int(a), int(b), offset + int(a),
                                       int(lens[a:b].sum())))
        offset += len(lens)
    return tasks


def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (settings, plans)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
