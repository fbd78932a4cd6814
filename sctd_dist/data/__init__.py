"""Data pipeline: corpus -> tokenizer -> packed shards -> dynamic masking -> resumable loader.

Modules (each has one job):
    sample    offline English sample corpus from installed docstrings
    sources   --input specs -> `datasets` text datasets
    tokenizer load / train (deterministic WordPiece) / fingerprint a tokenizer, special ids
    packing   rows of [CLS] ... [SEP] and the hashed validation split
    prepare   the parallel, resumable preparation CLI; `ensure_sample_dataset`
    dataset   `PackedDataset`, `load_tokenizer`, `check_compatible`
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
    "ensure_sample_dataset": "prepare",
    "default_cache_dir": "prepare",
    "PackedDataset": "dataset",
    "load_tokenizer": "dataset",
    "check_compatible": "dataset",
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
