"""The tokenizer of a preparation: loaded, reused from the output folder, or trained on the
corpus's training split; saved into the folder so that training needs nothing else."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sctd_dist.coordination import atomic_write

from .dataset import METADATA_FILE, TOKENIZER_DIR
from .packing import is_validation_document
from .shard_plan import digest
from .shard_worker import iter_texts
from .tokenizer import load_pretrained_tokenizer, tokenizer_fingerprint, train_wordpiece_tokenizer

log = logging.getLogger(__name__)

TRAINING_RECORD = "tokenizer_training.json"


def _existing_tokenizer_fingerprint(out: Path) -> tuple[str | None, str]:
    """Fingerprint (and a description) of the tokenizer an output folder was made with, if any."""
    if (out / METADATA_FILE).is_file():
        meta = json.loads((out / METADATA_FILE).read_text())
        return meta["tokenizer"]["fingerprint"], meta["tokenizer"].get("source", "?")
    for marker in sorted(out.glob("shard-*.json"))[:1]:
        try:
            return json.loads(marker.read_text())["tokenizer"], "an interrupted earlier run"
        except (OSError, ValueError, KeyError):
            pass
    if (out / TOKENIZER_DIR / "tokenizer.json").is_file():
        tok = load_pretrained_tokenizer(out / TOKENIZER_DIR, local_only=True)
        return tokenizer_fingerprint(tok), str(out / TOKENIZER_DIR)
    return None, ""


def _drop_unrecorded_tokenizer(out: Path) -> None:
    """Remove a tokenizer folder that nothing records: a run killed after saving the tokenizer but
    before its training record or any shard would otherwise find "another tokenizer" in its own
    folder (or a half-written tokenizer.json). Nothing made from it exists yet, so it is redone."""
    recorded = ((out / METADATA_FILE).is_file() or (out / TRAINING_RECORD).is_file()
                or any(out.glob("shard-*.json")))
    if not recorded and (out / TOKENIZER_DIR).exists():
        log.info("removing %s, left by an interrupted run", out / TOKENIZER_DIR)
        shutil.rmtree(out / TOKENIZER_DIR)


def tokenizer_mismatch(out: Path, have: str, have_desc: str, want: str, want_desc: str) -> ValueError:
    return ValueError(
        f"{out} was prepared with another tokenizer ({have_desc}, fingerprint {have}) than the one "
        f"requested ({want_desc}, fingerprint {want}). Use a new --out folder, delete {out}, or "
        "request the tokenizer it was made with.")


def obtain_tokenizer(out: Path, sources: list[Any], tokenizer: str | None,
                      train_vocab: int | None, seed: int, validation_fraction: float,
                      lowercase: bool, max_length: int) -> tuple[Any, str, dict | None]:
    """Load, reuse or train the tokenizer; returns (tokenizer, source description, training record)."""
    _drop_unrecorded_tokenizer(out)
    have, have_desc = _existing_tokenizer_fingerprint(out)
    if tokenizer is not None:
        tok = load_pretrained_tokenizer(tokenizer)
        fp = tokenizer_fingerprint(tok)
        if have is not None and have != fp:
            raise tokenizer_mismatch(out, have, have_desc, fp, f"--tokenizer {tokenizer}")
        return tok, str(tokenizer), None

    record = {"vocab_size": train_vocab, "lowercase": lowercase, "seed": seed,
              "validation_fraction": validation_fraction,
              "sources": digest([s.description for s in sources])}
    record_path = out / TRAINING_RECORD
    want_desc = f"--train-tokenizer {train_vocab}"
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("record") != record:
            raise tokenizer_mismatch(out, old.get("fingerprint", "?"),
                                      f"trained WordPiece, vocabulary {old['record'].get('vocab_size')}",
                                      "(not trained yet)", want_desc)
        tok = load_pretrained_tokenizer(out / TOKENIZER_DIR, local_only=True)
        return tok, f"trained WordPiece ({train_vocab})", record
    if have is not None:
        raise tokenizer_mismatch(out, have, have_desc, "(not trained yet)", want_desc)

    def train_texts() -> Iterator[str]:  # the training split only: validation stays unseen
        offset = 0
        for source in sources:
            for start in range(0, source.num_rows, 10_000):
                stop = min(start + 10_000, source.num_rows)
                held = is_validation_document(np.arange(offset + start, offset + stop),
                                              validation_fraction, seed)
                for text, h in zip(_texts_of(source.dataset, start, stop), held):
                    if not h and text:
                        yield text
            offset += source.num_rows

    t0 = time.perf_counter()
    tok = train_wordpiece_tokenizer(train_texts, train_vocab, lowercase=lowercase,
                                    model_max_length=max_length)
    log.info("trained a WordPiece tokenizer: %d tokens in %.1fs", len(tok), time.perf_counter() - t0)
    return tok, f"trained WordPiece ({train_vocab})", record


def _texts_of(dataset: Any, start: int, stop: int) -> Iterator[str]:
    for texts in iter_texts(dataset, start, stop):
        yield from texts


def model_positions(tokenizer: str | None, tok: Any) -> tuple[int | None, str]:
    """The position limit implied by a pretrained tokenizer (config.json or model_max_length)."""
    if tokenizer is not None:
        config = Path(tokenizer).expanduser() / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("max_position_embeddings")
            if value:
                return int(value), f"max_position_embeddings in {config}"
        limit = getattr(tok, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            return limit, f"model_max_length of tokenizer {tokenizer}"
    return None, ""


def save_tokenizer(out: Path, tok: Any, training: dict | None) -> Any:
    """Save `tok` into `out` (once) and return it as reloaded from there, which must be the
    same tokenizer; a trained one also gets its training record."""
    tok_dir = out / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        tok.save_pretrained(str(tok_dir))
    saved = load_pretrained_tokenizer(tok_dir, local_only=True)
    fingerprint = tokenizer_fingerprint(saved)
    if len(saved) != len(tok) or fingerprint != tokenizer_fingerprint(tok):
        raise RuntimeError(f"the tokenizer saved in {tok_dir} does not reload identically")
    if training is not None and not (out / TRAINING_RECORD).is_file():
        atomic_write(out / TRAINING_RECORD, json.dumps({"record": training, "fingerprint": fingerprint},
                                                        indent=1).encode())
    return saved
