"""Fixtures shared across test packages: one prepared sample dataset (seq 64) for every
training test and xdist worker."""

from __future__ import annotations

import os

import pytest

# Nothing in the tests may reach a model or dataset hub (set before any Hugging Face import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ = 64  # sequence length of the shared sample dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from sctd_dist.data.sample_cache import ensure_sample_dataset

    # The parent of the per-worker base temp is shared by all xdist workers; the builder locks.
    return ensure_sample_dataset(tmp_path_factory.getbasetemp().parent / "sctd-data", seq_length=SEQ)
