"""Tokenizing and packing shards, in this process or a pool of workers.

Each shard is written as one `.bin` file per split, then its completion record
(`shard-NNNNN.json`); a re-run skips the shards whose record and files are intact.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sctd_dist.coordination import atomic_write

from .packing import SequencePacker, is_validation_document
from .shard_plan import ShardTask

SPLITS = ("train", "validation")
_ENCODE_BATCH = 1000


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
    return {split: f"{split}-{index:05d}.bin" for split in SPLITS}


def _marker_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.json"


def iter_texts(dataset: Any, start: int, stop: int, batch: int = _ENCODE_BATCH) -> Iterator[list[str]]:
    part = dataset.select(range(start, stop)).with_format("arrow")
    for table in part.iter(batch_size=batch):
        yield [t or "" for t in table.column("text").to_pylist()]


def _run_shard(task: ShardTask) -> dict:
    """Tokenize and pack one shard; write its .bin files, then its completion record."""
    st = _STATE
    out: Path = st["out"]
    dtype = np.dtype(st["dtype"])
    packers = {split: SequencePacker(st["seq_length"], cls_id=st["cls"], sep_id=st["sep"],
                                     pad_id=st["pad"], dtype=dtype) for split in SPLITS}
    doc = task.doc_offset
    for texts in iter_texts(st["datasets"][task.source], task.start, task.stop):
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


def finished(out: Path, task: ShardTask, plan: str, row_bytes: int) -> dict | None:
    """The completion record of a shard if it is done and its files are intact, else None."""
    try:
        record = json.loads(_marker_path(out, task.index).read_text())
    except (OSError, ValueError):
        return None
    if record.get("plan") != plan:
        return None
    for split in SPLITS:
        info = record.get(split) or {}
        path = out / str(info.get("file"))
        if not path.is_file() or path.stat().st_size != info.get("num_sequences", -1) * row_bytes:
            return None
    return record


def run_shards(pending: list[ShardTask], records: dict[int, dict], tasks: list[ShardTask], *,
               datasets: list[Any], tokenizer_json: str, settings: dict, num_proc: int,
               progress: bool) -> None:
    """Run every pending shard (in this process, or a pool of `num_proc` workers) and add its
    completion record to `records`, with a progress bar over the corpus's documents."""
    total_docs = sum(t.stop - t.start for t in tasks)
    with _progress(total_docs, progress) as bar:
        bar.update(sum(t.stop - t.start for t in tasks if t.index in records))
        procs = min(num_proc, len(pending))
        if procs <= 1:
            _init_worker(datasets, tokenizer_json, {**settings, "on_progress": bar.update}, in_pool=False)
            for task in pending:
                records[task.index] = _run_shard(task)
        elif pending:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(procs, initializer=_init_worker,
                          initargs=(datasets, tokenizer_json, settings, True)) as pool:
                for record in pool.imap_unordered(_run_shard, pending):
                    records[record["index"]] = record
                    task = tasks[record["index"]]
                    bar.update(task.stop - task.start)


@contextmanager
def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="doc", desc="prepare", disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
