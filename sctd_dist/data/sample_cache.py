"""The embedded sample corpus, prepared once into a cache folder (the default training data)."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .dataset import METADATA_FILE, read_metadata


def default_cache_dir() -> Path:
    """Where the sample dataset is built: $SCTD_DIST_CACHE, else ./data_cache."""
    return Path(os.environ.get("SCTD_DIST_CACHE", "data_cache")).expanduser()


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # concurrent ranks: one builds, the others wait and reuse
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_sample_dataset(cache_dir: str | Path | None = None, seq_length: int = 128,
                          vocab_size: int = 8192, *, num_proc: int | None = None,
                          validation_fraction: float = 0.01, progress: bool = False) -> Path:
    """The prepared sample dataset (sample corpus -> trained WordPiece -> packed shards), built once.

    Returns `cache_dir/sample-s{seq_length}-v{vocab_size}` (plus `-val{validation_fraction}` when
    it is not the default 1%); a complete folder made with the same settings is returned as is.
    Safe to call from every rank at once (a file lock serialises the build). Takes ~15 s on 2 CPU
    cores the first time.
    """
    from .prepare import prepare_corpus
    from .sample import write_sample_corpus

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / f"sample-s{seq_length}-v{vocab_size}"
    if validation_fraction != 0.01:
        out = out.with_name(f"{out.name}-val{validation_fraction:g}")
    with _file_lock(cache / ".sample.lock"):
        if (out / METADATA_FILE).is_file():
            meta = read_metadata(out)
            trained = meta["tokenizer"].get("trained") or {}
            if meta["seq_length"] == seq_length and trained.get("vocab_size") == vocab_size:
                return out
        corpus = cache / "sample_corpus.txt"
        if not corpus.is_file():
            write_sample_corpus(corpus)
        prepare_corpus([str(corpus)], out, seq_length, train_tokenizer_vocab=vocab_size,
                       num_proc=num_proc or min(2, os.cpu_count() or 1),
                       validation_fraction=validation_fraction, seed=1234,
                       datasets_cache_dir=cache / ".hf_datasets", progress=progress)
    return out
