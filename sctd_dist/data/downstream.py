"""The offline downstream suite: two fine-tuning tasks generated from Python's standard library.

`python -m sctd_dist.data.downstream --out DIR` writes, for each task, `DIR/<task>/train.jsonl`
and `DIR/<task>/validation.jsonl` in the Hugging Face `run_glue` convention (`sentence1`
[`sentence2`] `label`), which `python -m sctd_dist.finetune --train-file ... --validation-file ...`
reads; `--task stdlib-topic` / `--task stdlib-samedoc` builds them in memory instead.

Source text: the prose paragraphs of the docstrings of the standard library installed with
Python (every machine that runs this code has it; nothing is downloaded). The embedded
pretraining corpus (`sample.py`) is built from other packages' docstrings, a few of which vendor
stdlib text, so every paragraph sharing an 8-word run with that corpus is dropped: the suite
holds no text the sample-corpus model saw in pretraining.

Tasks:
  * `stdlib-topic` (single text, 5 balanced classes): which area of the library a paragraph
    documents (GUI, internet, concurrency, packaging/imports, logging/testing/debugging), by the
    module it comes from. Learnable from vocabulary, so a small model learns it in seconds.
  * `stdlib-samedoc` (pairs, balanced binary): do two paragraphs come from the same module
    file? It needs a judgement on the meaning of both passages, not on one keyword.

Splits are made by source (a docstring for the topic task, a module file for the pair task), so
no passage of the validation split, nor its document, is seen in training. The output is a pure
function of the Python version's standard library, the corpus packages' versions and `--seed`.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from sctd_dist.coordination import atomic_write

from .sample import DEFAULT_TARGET_BYTES, docstring_prose, read_source, sample_corpus_documents

TASKS = ("stdlib-topic", "stdlib-samedoc")
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.2
SHINGLE_WORDS = 8  # a shared run of this many words counts as overlap with the corpus
MAX_ANCHORS_PER_FILE = 40  # pair task: keeps the few huge modules (tkinter) from dominating

# Area of the library -> top-level modules/packages documenting it.
TOPICS: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter", "idlelib", "turtle", "turtledemo"),
    "internet": ("email", "http", "urllib", "smtplib", "mailbox", "xmlrpc", "wsgiref", "ftplib",
                 "imaplib", "poplib", "nntplib", "mimetypes", "telnetlib", "cgi", "ssl",
                 "socketserver", "socket", "webbrowser", "smtpd", "uu", "quopri"),
    "concurrency": ("asyncio", "threading", "multiprocessing", "concurrent", "subprocess", "queue",
                    "sched", "selectors", "_threading_local", "asyncore", "asynchat"),
    "packaging": ("distutils", "importlib", "lib2to3", "pkgutil", "zipimport", "site", "venv",
                  "ensurepip", "modulefinder", "runpy", "compileall", "py_compile", "imp"),
    "debugging": ("logging", "unittest", "pdb", "bdb", "doctest", "traceback", "trace", "cProfile",
                  "profile", "pstats", "timeit", "faulthandler", "tracemalloc", "warnings"),
}
_TOPIC_OF = {module: topic for topic, modules in TOPICS.items() for module in modules}
_SKIP_PARTS = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Passage:
    """One prose paragraph of a stdlib docstring and where it comes from."""

    text: str
    file: str  # path relative to the stdlib folder: the "document" of the pair task
    docstring: int  # index of the docstring in its file


def _module_of(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _shingles(words: Sequence[str]) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))


def _corpus_shingles(documents: Iterable[str]) -> set[int]:
    return {hash(s) for doc in documents for s in _shingles(doc.split())}


@lru_cache(maxsize=2)
def stdlib_passages(stdlib: str | None = None, exclude_corpus_bytes: int = DEFAULT_TARGET_BYTES
                    ) -> tuple[Passage, ...]:
    """Every prose paragraph of the standard library's docstrings (sorted by file), minus those
    sharing an 8-word run with the embedded sample corpus of `exclude_corpus_bytes` (0: keep all).
    Each paragraph appears once (the first occurrence)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    excluded = _corpus_shingles(sample_corpus_documents(exclude_corpus_bytes)) if exclude_corpus_bytes else set()
    seen: set[str] = set()
    out: list[Passage] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_PARTS.intersection(relative.parts):
            continue
        source = read_source(path)
        if source is None:
            continue
        for index, paragraphs in enumerate(docstring_prose(source)):
            for text in paragraphs:
                if text in seen or any(hash(s) in excluded for s in _shingles(text.split())):
                    continue
                seen.add(text)
                out.append(Passage(text, relative.as_posix(), index))
    if not out:
        raise RuntimeError(f"no docstring prose found under {root}: is the standard library's source installed?")
    return tuple(out)


def _split_groups(keys: list, rng: random.Random, sizes: dict) -> tuple[set, set]:
    """Shuffle group keys and give groups to validation until it holds VALIDATION_FRACTION of the
    items (sizes[key] items per group); returns (train keys, validation keys)."""
    keys = sorted(keys)
    rng.shuffle(keys)
    total = sum(sizes[k] for k in keys)
    validation: set = set()
    held = 0
    for key in keys:
        if held >= VALIDATION_FRACTION * total:
            break
        validation.add(key)
        held += sizes[key]
    return set(keys) - validation, validation


def topic_task(passages: Sequence[Passage], seed: int = 0) -> dict[str, list[dict]]:
    """`stdlib-topic`: {"sentence1": paragraph, "label": area}, classes balanced in each split."""
    rng = random.Random(seed)
    by_topic: dict[str, dict[tuple[str, int], list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in passages:
        topic = _TOPIC_OF.get(_module_of(Path(p.file)))
        if topic is not None:
            by_topic[topic][(p.file, p.docstring)].append(p.text)
    splits: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for topic in sorted(by_topic):
        docs = by_topic[topic]
        train, validation = _split_groups(list(docs), rng, {k: len(v) for k, v in docs.items()})
        for split, keys in zip(SPLITS, (train, validation)):
            splits[split][topic] = [t for k in sorted(keys) for t in docs[k]]
    out: dict[str, list[dict]] = {}
    for split, per_topic in splits.items():
        n = min(len(v) for v in per_topic.values())  # balanced: the majority class is 1/len(TOPICS)
        rows = [{"sentence1": text, "label": topic}
                for topic, texts in sorted(per_topic.items()) for text in rng.sample(texts, n)]
        rng.shuffle(rows)
        out[split] = rows
    return out


def samedoc_task(passages: Sequence[Passage], seed: int = 0) -> dict[str, list[dict]]:
    """`stdlib-samedoc`: {"sentence1", "sentence2", "label": 1 if both come from one module file}.

    Every paragraph (at most MAX_ANCHORS_PER_FILE per file) is the first passage of one pair;
    half the pairs take the second from the same file, half from another file of the split."""
    rng = random.Random(seed)
    by_file: dict[str, list[str]] = defaultdict(list)
    for p in passages:
        by_file[p.file].append(p.text)
    files = {f: texts for f, texts in by_file.items() if len(texts) >= 2}
    train, validation = _split_groups(list(files), rng, {f: len(t) for f, t in files.items()})
    out: dict[str, list[dict]] = {}
    for split, keys in zip(SPLITS, (train, validation)):
        keys = sorted(keys)
        rows = []
        for f in keys:
            texts = files[f]
            for i in rng.sample(range(len(texts)), min(len(texts), MAX_ANCHORS_PER_FILE)):
                same = rng.random() < 0.5
                if same:
                    j = rng.choice([j for j in range(len(texts)) if j != i])
                    other = texts[j]
                else:
                    other = rng.choice(files[rng.choice([k for k in keys if k != f])])
                rows.append({"sentence1": texts[i], "sentence2": other, "label": int(same)})
        rng.shuffle(rows)
        out[split] = rows
    return out


@lru_cache(maxsize=4)
def build_task(name: str, seed: int = 0) -> dict[str, list[dict]]:
    """The rows of offline task `name` ({"train": [...], "validation": [...]})."""
    if name not in TASKS:
        raise ValueError(f"unknown offline task {name!r}; choose one of {list(TASKS)}")
    make = topic_task if name == "stdlib-topic" else samedoc_task
    return make(stdlib_passages(), seed)


def write_suite(out_dir: str | Path, seed: int = 0, tasks: Sequence[str] = TASKS) -> dict[str, dict[str, Path]]:
    """Write each task's splits as `out_dir/<task>/<split>.jsonl`; returns the paths."""
    paths: dict[str, dict[str, Path]] = {}
    for name in tasks:
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        paths[name] = {}
        for split, rows in build_task(name, seed).items():
            path = folder / f"{split}.jsonl"
            atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            paths[name][split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sctd_dist.data.downstream",
                                description="Write the offline downstream suite (jsonl, run_glue columns).")
    p.add_argument("--out", required=True, type=Path, help="folder to write <task>/{train,validation}.jsonl to")
    p.add_argument("--seed", type=int, default=0, help="split and pairing seed (default 0)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = p.parse_args(argv)
    for name, files in write_suite(args.out, args.seed, args.tasks).items():
        sizes = ", ".join(f"{split} {len(path.read_text(encoding='utf-8').splitlines())}"
                          for split, path in files.items())
        print(f"{name}: {sizes} rows in {files['train'].parent}")


if __name__ == "__main__":
    main()
