"""Prepare a corpus once: inputs -> tokenizer -> packed, memory-mapped shards + metadata.

    python -m sctd_dist.data.prepare --input SRC [SRC ...] \\
        (--tokenizer NAME_OR_DIR | --train-tokenizer VOCAB_SIZE) --seq-length N --out DIR \\
        [--num-proc P] [--validation-fraction F]

Output folder::

    DIR/metadata.json            counts, sequence length, dtype, tokenizer fingerprint, sources,
                                 and the shard list of each split; written last (= complete)
    DIR/tokenizer/               the tokenizer (save_pretrained): training needs nothing else
    DIR/train-00000.bin ...      rows of `seq_length` token ids, raw little-endian uint16/int32
    DIR/validation-00000.bin     the held-out documents, packed the same way
    DIR/shard-00000.json ...     per-shard completion records: a re-run skips finished shards

Work is split into shards of contiguous documents (about 64 MiB of text each, at least 16
shards when the corpus is big enough, never depending on --num-proc) that are tokenized and
packed independently, in parallel; see `packing.py` for the row layout. A document goes to the
validation split with probability F, decided by a hash of (seed, document index).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sctd_dist.coordination import atomic_write

from .documents import BOUNDARY_RECORD
from .dataset import FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_DIR, read_metadata
from .packing import MIN_SEQ_LENGTH, SequencePacker, is_validation_document, token_dtype
from .tokenizer import (
    load_pretrained_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
    train_wordpiece_tokenizer,
)

log = logging.getLogger(__name__)

SHARD_TARGET_BYTES = 64 << 20  # text bytes per shard for large corpora
MIN_SHARD_BYTES = 256 << 10  # ... but never smaller than this
MIN_PARALLEL_SHARDS = 16  # ... and at least this many shards when the corpus allows it
TRAINING_RECORD = "tokenizer_training.json"
_ENCODE_BATCH = 1000
_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ShardTask:
    """A contiguous range of documents of one source, packed into one output shard per split."""

    index: int
    source: int
    start: int
    stop: int
    doc_offset: int  # global index (over all sources) of document `start`
    text_bytes: int


# ----------------------------------------------------------------------------- planning

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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- shard workers

_STATE: dict[str, Any] = {}


def _init_worker(datasets: list[Any], tokenizer_json: str, settings: dict, in_pool: bool) -> None:
    from tokenizers import Tokenizer

    if in_pool:  # one process per core already: no Rust thread pool on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True  # "[MASK]" written in a text is text, not the mask token
    tok.no_truncation()
    tok.no_padding()
    _STATE.update(datasets=datasets, tokenizer=tok, **settings)


def _shard_files(index: int) -> dict[str, str]:
    return {split: f"{split}-{index:05d}.bin" for split in _SPLITS}


def _marker_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.json"


def _iter_texts(dataset: Any, start: int, stop: int, batch: int = _ENCODE_BATCH) -> Iterator[list[str]]:
    part = dataset.select(range(start, stop)).with_format("arrow")
    for table in part.iter(batch_size=batch):
        yield [t or "" for t in table.column("text").to_pylist()]


def _run_shard(task: ShardTask) -> dict:
    """Tokenize and pack one shard; write its .bin files, then its completion record."""
    st = _STATE
    out: Path = st["out"]
    dtype = np.dtype(st["dtype"])
    packers = {split: SequencePacker(st["seq_length"], cls_id=st["cls"], sep_id=st["sep"],
                                     pad_id=st["pad"], dtype=dtype) for split in _SPLITS}
    doc = task.doc_offset
    for texts in _iter_texts(st["datasets"][task.source], task.start, task.stop):
        held_out = is_validation_document(np.arange(doc, doc + len(texts)), st["validation_fraction"],
                                          st["seed"])
        doc += len(texts)
        for enc, val in zip(st["tokenizer"].encode_batch_fast(texts, add_special_tokens=False), held_out):
            packers["validation" if val else "train"].add(np.asarray(enc.ids, dtype=dtype))
        if st.get("on_progress") is not None:
            st["on_progress"](len(texts))
    record = {"index": task.index, "plan": st["plan"], "tokenizer": st["tokenizer_fingerprint"],
              "task": asdict(task)}
    for split, name in _shard_files(task.index).items():
        rows = packers[split].finish()
        atomic_write(out / name, rows.tobytes())
        record[split] = {"file": name, "num_sequences": int(rows.shape[0]),
                         "num_tokens": int(packers[split].num_tokens),
                         "num_documents": int(packers[split].num_documents),
                         "num_padding": int(packers[split].num_padding)}
    atomic_write(_marker_path(out, task.index), json.dumps(record, indent=1).encode())
    return record


def _finished(out: Path, task: ShardTask, plan: str, row_bytes: int) -> dict | None:
    """The completion record of a shard if it is done and its files are intact, else None."""
    try:
        record = json.loads(_marker_path(out, task.index).read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan:
        return None
    for split in _SPLITS:
        info = record.get(split) or {}
        path = out / str(info.get("file"))
        if not path.is_file() or path.stat().st_size != info.get("num_sequences", -1) * row_bytes:
            return None
    return record


# ----------------------------------------------------------------------------- tokenizer

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


def _tokenizer_mismatch(out: Path, have: str, have_desc: str, want: str, want_desc: str) -> ValueError:
    return ValueError(
        f"{out} was prepared with another tokenizer ({have_desc}, fingerprint {have}) than the one "
        f"requested ({want_desc}, fingerprint {want}). Use a new --out folder, delete {out}, or "
        "request the tokenizer it was made with.")


def _obtain_tokenizer(out: Path, sources: list[Any], tokenizer: str | None,
                      train_vocab: int | None, seed: int, validation_fraction: float,
                      lowercase: bool, max_length: int) -> tuple[Any, str, dict | None]:
    """Load, reuse or train the tokenizer; returns (tokenizer, source description, training record)."""
    _drop_unrecorded_tokenizer(out)
    have, have_desc = _existing_tokenizer_fingerprint(out)
    if tokenizer is not None:
        tok = load_pretrained_tokenizer(tokenizer)
        fp = tokenizer_fingerprint(tok)
        if have is not None and have != fp:
            raise _tokenizer_mismatch(out, have, have_desc, fp, f"--tokenizer {tokenizer}")
        return tok, str(tokenizer), None

    record = {"vocab_size": train_vocab, "lowercase": lowercase, "seed": seed,
              "validation_fraction": validation_fraction,
              "sources": _digest([s.description for s in sources])}
    record_path = out / TRAINING_RECORD
    want_desc = f"--train-tokenizer {train_vocab}"
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("record") != record:
            raise _tokenizer_mismatch(out, old.get("fingerprint", "?"),
                                      f"trained WordPiece, vocabulary {old['record'].get('vocab_size')}",
                                      "(not trained yet)", want_desc)
        tok = load_pretrained_tokenizer(out / TOKENIZER_DIR, local_only=True)
        return tok, f"trained WordPiece ({train_vocab})", record
    if have is not None:
        raise _tokenizer_mismatch(out, have, have_desc, "(not trained yet)", want_desc)

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
    for texts in _iter_texts(dataset, start, stop):
        yield from texts


def _model_positions(tokenizer: str | None, tok: Any) -> tuple[int | None, str]:
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


# ----------------------------------------------------------------------------- driver

@contextmanager
def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="prepare", disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def prepare_corpus(
    inputs: list[str],
    out_dir: str | Path,
    seq_length: int,
    tokenizer: str | None = None,
    train_tokenizer_vocab: int | None = None,
    num_proc: int = 1,
    validation_fraction: float = 0.01,
    seed: int = 1234,
    *,
    text_column: str = "text",
    text_sample_by: str = "line",
    max_position_embeddings: int | None = None,
    lowercase: bool = True,
    shard_bytes: int = SHARD_TARGET_BYTES,
    datasets_cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize and pack `inputs` into `out_dir` (see the module docstring); returns `out_dir`.

    Exactly one of `tokenizer` (hub name or folder) and `train_tokenizer_vocab` must be given.
    Re-running with the same arguments skips finished shards (and returns at once when the
    folder is complete); a folder made with another tokenizer or other settings is an error.
    """
    from .sources import load_sources

    if (tokenizer is None) == (train_tokenizer_vocab is None):
        raise ValueError("give exactly one of --tokenizer NAME_OR_DIR and --train-tokenizer VOCAB_SIZE")
    if seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"--seq-length {seq_length} is too short; use at least {MIN_SEQ_LENGTH}")
    if max_position_embeddings is not None and seq_length > max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is larger than the model's {max_position_embeddings} "
                         f"position embeddings; use --seq-length <= {max_position_embeddings}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if num_proc < 1:
        raise ValueError(f"--num-proc must be >= 1, got {num_proc}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    t_start = time.perf_counter()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    sources = load_sources(list(inputs), text_column=text_column, text_sample_by=text_sample_by,
                           cache_dir=datasets_cache_dir)
    tasks = plan_shards(sources, shard_bytes)
    if not tasks:
        raise ValueError(f"empty corpus: the inputs {list(inputs)} hold no text")

    tok, tok_desc, training = _obtain_tokenizer(out, sources, tokenizer, train_tokenizer_vocab, seed,
                                                validation_fraction, lowercase, max(512, seq_length))
    limit, limit_desc = _model_positions(tokenizer, tok)
    if limit is not None and seq_length > limit:
        raise ValueError(f"--seq-length {seq_length} is larger than the model's positions ({limit}, "
                         f"{limit_desc}); use --seq-length <= {limit}")
    specials = special_token_ids(tok, f"tokenizer {tok_desc}")
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
    vocab_size = len(saved)
    dtype = token_dtype(vocab_size)

    settings = {"format": FORMAT, "version": FORMAT_VERSION, "seq_length": seq_length,
                "dtype": dtype.name, "validation_fraction": validation_fraction, "seed": seed,
                "tokenizer_fingerprint": fingerprint,
                "sources": [{"spec": s.spec, **s.description} for s in sources],
                "shards": [[t.source, t.start, t.stop] for t in tasks]}
    plan = _digest(settings)
    _check_existing(out, plan, settings)
    if (out / METADATA_FILE).is_file():
        log.info("%s is already complete", out)
        return out

    row_bytes = seq_length * dtype.itemsize
    records: dict[int, dict] = {}
    pending: list[ShardTask] = []
    for task in tasks:
        done = _finished(out, task, plan, row_bytes)
        if done is not None:
            records[task.index] = done
        else:
            pending.append(task)
    if records:
        log.info("skipping %d finished shard(s) of %d", len(records), len(tasks))

    worker_settings = {"out": out, "dtype": dtype.name, "seq_length": seq_length,
                       "cls": specials.cls, "sep": specials.sep, "pad": specials.pad,
                       "validation_fraction": validation_fraction, "seed": seed, "plan": plan,
                       "tokenizer_fingerprint": fingerprint}
    tokenizer_json = str(tok_dir / "tokenizer.json")
    datasets = [s.dataset for s in sources]
    total_docs = sum(s.num_rows for s in sources)
    with _progress(total_docs, progress) as bar:
        bar.update(sum(t.stop - t.start for t in tasks if t.index in records))
        procs = min(num_proc, len(pending))
        if procs <= 1:
            _init_worker(datasets, tokenizer_json, {**worker_settings, "on_progress": bar.update},
                         in_pool=False)
            for task in pending:
                records[task.index] = _run_shard(task)
        elif pending:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(procs, initializer=_init_worker,
                          initargs=(datasets, tokenizer_json, worker_settings, True)) as pool:
                for record in pool.imap_unordered(_run_shard, pending):
                    records[record["index"]] = record
                    task = tasks[record["index"]]
                    bar.update(task.stop - task.start)

    meta = _metadata(out, settings, plan, records, tasks, tok_desc, fingerprint, specials, vocab_size,
                     training, list(inputs))
    seconds = time.perf_counter() - t_start
    tokens = meta["splits"]["train"]["num_tokens"] + meta["splits"]["validation"]["num_tokens"]
    meta["preparation_seconds"] = round(seconds, 3)
    atomic_write(out / METADATA_FILE, json.dumps(meta, indent=1).encode())
    log.info("prepared %s: %d train / %d validation sequences, %d tokens in %.1fs (%.0f tokens/s)",
             out, meta["splits"]["train"]["num_sequences"], meta["splits"]["validation"]["num_sequences"],
             tokens, seconds, tokens / max(seconds, 1e-9))
    return out


def _check_existing(out: Path, plan: str, settings: dict) -> None:
    """Refuse to mix a new preparation into a folder holding one with other settings."""
    old: dict | None = None
    if (out / METADATA_FILE).is_file():
        old = json.loads((out / METADATA_FILE).read_text()).get("settings")
    else:
        for marker in sorted(out.glob("shard-*.json"))[:1]:
            plan_old = json.loads(marker.read_text()).get("plan")
            if plan_old != plan:
                raise ValueError(f"{out} holds an unfinished preparation with other inputs or settings; "
                                 "use a new --out folder or delete it")
    if old is not None and _digest(old) != plan:
        changed = sorted(k for k in settings if settings.get(k) != old.get(k))
        if "tokenizer_fingerprint" in changed:
            raise _tokenizer_mismatch(out, old.get("tokenizer_fingerprint"), "recorded in metadata.json",
                                      settings["tokenizer_fingerprint"], "the requested tokenizer")
        raise ValueError(f"{out} was prepared with other settings ({', '.join(changed)} differ); "
                         "use a new --out folder or delete it")


def _metadata(out: Path, settings: dict, plan: str, records: dict[int, dict], tasks: list[ShardTask],
              tok_desc: str, fingerprint: str, specials: Any, vocab_size: int, training: dict | None,
              inputs: list[str]) -> dict:
    import datasets as hf_datasets
    import tokenizers

    from .. import __version__

    splits: dict[str, dict] = {}
    for split in _SPLITS:
        shards = [records[t.index][split] for t in tasks]
        splits[split] = {
            "num_sequences": sum(s["num_sequences"] for s in shards),
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "num_padding": sum(s["num_padding"] for s in shards),
            "shards": [s for s in shards if s["num_sequences"] > 0],
        }
    if splits["train"]["num_tokens"] == 0:
        if splits["validation"]["num_tokens"] > 0:
            raise ValueError("every document went to the validation split; lower --validation-fraction")
        raise ValueError(f"empty corpus: the inputs {inputs} hold no text that tokenizes to anything")
    seq = settings["seq_length"]
    for s in splits.values():
        s["padding_fraction"] = round(s["num_padding"] / max(1, s["num_sequences"] * seq), 6)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_length": seq,
        "dtype": settings["dtype"],
        "vocab_size": vocab_size,
        "tokenizer": {"dir": TOKENIZER_DIR, "source": tok_desc, "fingerprint": fingerprint,
                      "special_ids": specials.to_dict(), "trained": training},
        "packing": "rows of [CLS] tokens [SEP]; documents separated by [SEP] and continued across "
                   "rows; [PAD] only at the end of a shard; no NSP",
        "document_boundaries": BOUNDARY_RECORD,
        "inputs": inputs,
        "sources": settings["sources"],
        "validation_fraction": settings["validation_fraction"],
        "seed": settings["seed"],
        "num_shards": len(tasks),
        "splits": splits,
        "plan": plan,
        "settings": settings,
        "created_with": {"sctd_dist": __version__, "tokenizers": tokenizers.__version__,
                         "datasets": hf_datasets.__version__, "numpy": np.__version__},
    }


# ----------------------------------------------------------------------------- sample dataset

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


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sctd_dist.data.prepare",
        description="Tokenize and pack a corpus into memory-mapped shards for BERT pretraining.")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="local .txt/.jsonl/.parquet files or folders (also save_to_disk folders and "
                        "globs), or Hub datasets NAME[:CONFIG[:SPLIT]]")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="NAME_OR_DIR", help="a fast BERT tokenizer (hub name or folder)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a WordPiece tokenizer of this size on the corpus")
    p.add_argument("--seq-length", type=int, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--num-proc", type=int, default=1, metavar="P")
    p.add_argument("--validation-fraction", type=float, default=0.01, metavar="F")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--txt-sample-by", default="line", choices=("line", "paragraph", "document"),
                   help="what one document of a .txt file is (default: a line)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="fail early if --seq-length exceeds the model's positions")
    p.add_argument("--cased", action="store_true", help="trained tokenizer keeps case (default: lowercase)")
    p.add_argument("--shard-mb", type=float, default=SHARD_TARGET_BYTES / (1 << 20),
                   help="text per shard for large corpora (MiB)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        out = prepare_corpus(
            args.input, args.out, args.seq_length, tokenizer=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer, num_proc=args.num_proc,
            validation_fraction=args.validation_fraction, seed=args.seed, text_column=args.text_column,
            text_sample_by=args.txt_sample_by, max_position_embeddings=args.max_position_embeddings,
            lowercase=not args.cased, shard_bytes=int(args.shard_mb * (1 << 20)),
            progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    meta = read_metadata(out)
    print(json.dumps({k: meta[k] for k in ("seq_length", "dtype", "vocab_size", "num_shards")}
                     | {s: {k: v for k, v in meta["splits"][s].items() if k != "shards"}
                        for s in _SPLITS}, indent=1))


if __name__ == "__main__":
    main()
