"""Data pipeline: corpus -> tokenizer -> packed shards -> dynamic masking -> resumable loader.

Modules (each has one job):
    sample    offline English sample corpus from installed docstrings
    sources   --input specs -> `datasets` text datasets
    tokenizer load / train (deterministic WordPiece) / fingerprint a tokenizer, special ids
    packing   rows of [CLS] ... [SEP] and the hashed validation split
    shard_plan       the corpus cut into shards of contiguous documents
    shard_worker     tokenizing and packing shards (in process or a worker pool)
    corpus_tokenizer a preparation's tokenizer: loaded, reused or trained, then saved
    metadata         `metadata.json` of a prepared folder; refusing mixed settings
    prepare   `prepare_corpus` (the driver of the above) and the preparation CLI
    sample_cache     `ensure_sample_dataset`: the sample corpus prepared once, cached
    dataset   `PackedDataset`, `load_tokenizer`
    masking   `MaskingConfig`, `mask_sequence` (pure in (seed, epoch, sample index))
    sampler   the global sample stream, O(1) positioning, DP split
    loader    `PretrainingDataLoader`, `ValidationDataLoader`

Names are imported lazily so `import sctd_dist.data` stays cheap (no datasets/transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "write_sample_corpus": "sample",
    "prepare_corpus": "prepare",
    "ensure_sample_dataset": "sample_cache",
    "default_cache_dir": "sample_cache",
    "PackedDataset": "dataset",
    "load_tokenizer": "dataset",
    "read_metadata": "dataset",
    "SpecialTokenIds": "tokenizer",  # defined in sctd_dist.special_tokens (shared with the model)
    "special_token_ids": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
    "MaskingConfig": "masking",
    "mask_sequence": "masking",
    "mask_rows": "masking",
    "PretrainingDataLoader": "loader",
    "ValidationDataLoader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
