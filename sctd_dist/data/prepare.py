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
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sctd_dist.coordination import atomic_write
from sctd_dist.flags import add_flags, flag, from_flags

from .corpus_tokenizer import model_positions, obtain_tokenizer, save_tokenizer
from .dataset import FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_DIR, read_metadata
from .metadata import build_metadata, check_existing
from .packing import MIN_SEQ_LENGTH, token_dtype
from .shard_plan import SHARD_TARGET_BYTES, ShardTask, digest, plan_shards
from .shard_worker import SPLITS, finished, run_shards
from .tokenizer import special_token_ids, tokenizer_fingerprint

log = logging.getLogger(__name__)


def check_settings(seq_length: int, tokenizer: str | None, train_tokenizer_vocab: int | None,
                   num_proc: int, validation_fraction: float, seed: int,
                   max_position_embeddings: int | None) -> None:
    """Raise ValueError naming the flag to change, before any file is read."""
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

    check_settings(seq_length, tokenizer, train_tokenizer_vocab, num_proc, validation_fraction, seed,
                   max_position_embeddings)
    t_start = time.perf_counter()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sources = load_sources(list(inputs), text_column=text_column, text_sample_by=text_sample_by,
                           cache_dir=datasets_cache_dir)
    tasks = plan_shards(sources, shard_bytes)
    if not tasks:
        raise ValueError(f"empty corpus: the inputs {list(inputs)} hold no text")
    tok, tok_desc, training = obtain_tokenizer(out, sources, tokenizer, train_tokenizer_vocab, seed,
                                               validation_fraction, lowercase, max(512, seq_length))
    limit, limit_desc = model_positions(tokenizer, tok)
    if limit is not None and seq_length > limit:
        raise ValueError(f"--seq-length {seq_length} is larger than the model's positions ({limit}, "
                         f"{limit_desc}); use --seq-length <= {limit}")
    specials = special_token_ids(tok, f"tokenizer {tok_desc}")
    saved = save_tokenizer(out, tok, training)
    fingerprint, vocab_size = tokenizer_fingerprint(saved), len(saved)
    dtype = token_dtype(vocab_size)
    settings = {"format": FORMAT, "version": FORMAT_VERSION, "seq_length": seq_length,
                "dtype": dtype.name, "validation_fraction": validation_fraction, "seed": seed,
                "tokenizer_fingerprint": fingerprint,
                "sources": [{"spec": s.spec, **s.description} for s in sources],
                "shards": [[t.source, t.start, t.stop] for t in tasks]}
    plan = digest(settings)
    check_existing(out, plan, settings)
    if (out / METADATA_FILE).is_file():
        log.info("%s is already complete", out)
        return out
    worker_settings = {"out": out, "dtype": dtype.name, "seq_length": seq_length,
                       "cls": specials.cls, "sep": specials.sep, "pad": specials.pad,
                       "validation_fraction": validation_fraction, "seed": seed, "plan": plan,
                       "tokenizer_fingerprint": fingerprint}
    records = _pack(out, tasks, plan, seq_length * dtype.itemsize, sources, worker_settings, num_proc, progress)
    meta = build_metadata(out, settings, plan, records, tasks, tok_desc, fingerprint, specials, vocab_size,
                          training, list(inputs))
    _finish(out, meta, time.perf_counter() - t_start)
    return out


def _pack(out: Path, tasks: list[ShardTask], plan: str, row_bytes: int, sources: list[Any],
          worker_settings: dict, num_proc: int, progress: bool) -> dict[int, dict]:
    """Every shard's completion record: the finished ones read back, the others packed now."""
    records: dict[int, dict] = {}
    pending: list[ShardTask] = []
    for task in tasks:
        done = finished(out, task, plan, row_bytes)
        if done is not None:
            records[task.index] = done
        else:
            pending.append(task)
    if records:
        log.info("skipping %d finished shard(s) of %d", len(records), len(tasks))
    run_shards(pending, records, tasks, datasets=[s.dataset for s in sources],
               tokenizer_json=str(out / TOKENIZER_DIR / "tokenizer.json"), settings=worker_settings,
               num_proc=num_proc, progress=progress)
    return records


def _finish(out: Path, meta: dict, seconds: float) -> None:
    """Write `metadata.json` (last: the folder is complete) and log the throughput."""
    tokens = meta["splits"]["train"]["num_tokens"] + meta["splits"]["validation"]["num_tokens"]
    meta["preparation_seconds"] = round(seconds, 3)
    atomic_write(out / METADATA_FILE, json.dumps(meta, indent=1).encode())
    log.info("prepared %s: %d train / %d validation sequences, %d tokens in %.1fs (%.0f tokens/s)",
             out, meta["splits"]["train"]["num_sequences"], meta["splits"]["validation"]["num_sequences"],
             tokens, seconds, tokens / max(seconds, 1e-9))


# ----------------------------------------------------------------------------- CLI

@dataclass
class PrepareConfig:
    """The flags of `python -m sctd_dist.data.prepare`."""

    input: list[str] = flag(help="local .txt/.jsonl/.parquet files or folders (also save_to_disk folders "
                            "and globs), or Hub datasets NAME[:CONFIG[:SPLIT]]", metavar="SRC")
    seq_length: int = flag(help="tokens per row", metavar="N")
    out: str = flag(help="the prepared folder", metavar="DIR")
    tokenizer: str | None = flag(None, "a fast BERT tokenizer (hub name or folder)", metavar="NAME_OR_DIR")
    train_tokenizer: int | None = flag(None, "train a WordPiece tokenizer of this size on the corpus "
                                       "(give this or --tokenizer)", metavar="VOCAB_SIZE")
    num_proc: int = flag(1, "worker processes", metavar="P")
    validation_fraction: float = flag(0.01, "share of documents held out", metavar="F")
    seed: int = flag(1234, "seed of the validation split")
    text_column: str = flag("text", "column holding the text")
    txt_sample_by: str = flag("line", "what one document of a .txt file is",
                              choices=("line", "paragraph", "document"))
    max_position_embeddings: int | None = flag(None, "fail early if --seq-length exceeds the model's positions")
    cased: bool = flag(False, "trained tokenizer keeps case (default: lowercase)")
    shard_mb: float = flag(SHARD_TARGET_BYTES / (1 << 20), "text per shard for large corpora (MiB)")
    progress: bool = flag(True, "no progress bar", name="--no-progress")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `PrepareConfig` flag."""
    p = argparse.ArgumentParser(
        prog="python -m sctd_dist.data.prepare",
        description="Tokenize and pack a corpus into memory-mapped shards for BERT pretraining.")
    add_flags(p, PrepareConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = from_flags(PrepareConfig, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        out = prepare_corpus(
            args.input, args.out, args.seq_length, tokenizer=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer, num_proc=args.num_proc,
            validation_fraction=args.validation_fraction, seed=args.seed, text_column=args.text_column,
            text_sample_by=args.txt_sample_by, max_position_embeddings=args.max_position_embeddings,
            lowercase=not args.cased, shard_bytes=int(args.shard_mb * (1 << 20)), progress=args.progress)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    meta = read_metadata(out)
    print(json.dumps({k: meta[k] for k in ("seq_length", "dtype", "vocab_size", "num_shards")}
                     | {s: {k: v for k, v in meta["splits"][s].items() if k != "shards"}
                        for s in SPLITS}, indent=1))


if __name__ == "__main__":
    main()
