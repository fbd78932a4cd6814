"""Shared fixtures for the data-pipeline tests: small corpora, one prepared folder (offline:
see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

SEQ = 64


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """A private `datasets` cache, so the tests never write to ~/.cache."""
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~120 kB of the real sample corpus (one document per line)."""
    from sctd_dist.data.sample import write_sample_corpus

    return write_sample_corpus(tmp_path_factory.mktemp("corpus") / "small.txt", target_bytes=120_000)


@pytest.fixture(scope="session")
def small_texts(small_corpus) -> list[str]:
    return small_corpus.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_texts) -> Path:
    """A WordPiece tokenizer (2000 ids) trained on the small corpus and saved with save_pretrained."""
    from sctd_dist.data.tokenizer import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer(lambda: iter(small_texts), 2000)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    """The reference tokenizer, loaded the way users load one (transformers AutoTokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 2000
    return tok


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_corpus, tokenizer_dir, hf_cache) -> Path:
    """The small corpus prepared at sequence length 64, 10% validation, several shards."""
    from sctd_dist.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prepared")
    return prepare_corpus([str(small_corpus)], out, SEQ, tokenizer=str(tokenizer_dir), validation_fraction=0.1,
                          seed=7, shard_bytes=40_000, datasets_cache_dir=hf_cache, progress=False)

