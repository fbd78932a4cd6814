"""The embedded sample corpus: real English prose, built offline from installed docstrings.

`python -m sctd_dist.data.sample --out FILE` writes a few MB of text taken from the docstrings
of a fixed list of packages that every installation of this one has (our dependencies and
theirs: torch, transformers, datasets, numpy, sympy, ...). Nothing is downloaded and nothing is
imported: the package sources are read as text, docstrings are found with a regular expression,
and only paragraphs that read like prose are kept (no code, no doctest, no parameter tables),
each one once.

Format: **one document per line**, a document being the prose paragraphs of one docstring joined
by single spaces; no blank lines. `datasets`' "text" loader (and `prepare`) therefore sees one
document per row.

Determinism: packages are visited in sorted order, files in sorted order, and documents are taken
round-robin across packages until the target size is reached, so the same package versions
always produce the same bytes, and installing anything else (test or plotting tools) does not
change the corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from sctd_dist.coordination import atomic_write

DEFAULT_TARGET_BYTES = 3_000_000

# A triple-quoted string that starts a line: docstrings and bare string statements, not
# assignments such as `TEMPLATE = """..."""`.
_DOCSTRING = re.compile(r'^[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.S | re.M)
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_BACKTICKS = re.compile(r"`+([^`]*)`+")
_WORD = re.compile(r"[(\"']?[A-Za-z][a-z]*(?:[-'][A-Za-z]+)*[.,;:!?)\"']{0,2}")
_CODE_CHARS = frozenset("_=(){}[]<>/\\*|#@$%^~`")
_NON_PROSE_LINE = (">>>", "...", "..", "-", "*", "|", "+", "#", "=", "$")
_MAX_FILE_BYTES = 2_000_000  # generated sources (op tables and the like) hold no prose
# Installed with sctd-dist itself (directly or through torch/datasets), about 4.4 MB of prose.
CORPUS_PACKAGES = ("datasets", "deepspeed", "huggingface_hub", "networkx", "numpy", "pandas",
                   "sympy", "tensorboard", "torch", "transformers")


def _prose_paragraphs(docstring: str) -> Iterator[str]:
    """The paragraphs of a docstring that read like English sentences, on one line each."""
    for para in re.split(r"\n\s*\n", inspect.cleandoc(docstring)):
        lines = [line.strip() for line in textwrap.dedent(para).split("\n")]
        if any(line.startswith(_NON_PROSE_LINE) for line in lines):
            continue  # doctests, lists, tables, section underlines, directives
        text = _BACKTICKS.sub(r"\1", _RST_ROLE.sub(r"\1", " ".join(lines)))
        words = text.split()
        if len(words) < 10 or not text[0].isupper() or text[-1] not in ".!?":
            continue
        if sum(1 for w in words if _WORD.fullmatch(w)) < 0.8 * len(words):
            continue  # identifiers, numbers, signatures
        if sum(c in _CODE_CHARS for c in text) > 0.02 * len(text):
            continue
        if not text.isascii():
            continue  # keeps the corpus plain English and byte-stable across locales
        yield text


def _package_roots() -> list[Path]:
    """Folders of the CORPUS_PACKAGES found in site-packages, sorted by name."""
    roots: dict[str, Path] = {}
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        for name in CORPUS_PACKAGES:
            if name not in roots and (site / name / "__init__.py").is_file():
                roots[name] = site / name
    return [roots[name] for name in sorted(roots)]


def _package_documents(root: Path, seen: set[bytes]) -> Iterator[str]:
    """Documents (one per docstring with prose) of one package; `seen` drops repeats globally."""
    for path in sorted(root.rglob("*.py")):
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for match in _DOCSTRING.finditer(source):
            kept = []
            for para in _prose_paragraphs(match.group(2)):
                digest = hashlib.blake2b(para.encode(), digest_size=12).digest()
                if digest not in seen:
                    seen.add(digest)
                    kept.append(para)
            if kept:
                yield " ".join(kept)


def iter_sample_documents() -> Iterator[str]:
    """All sample documents, round-robin across installed packages (deterministic order)."""
    seen: set[bytes] = set()
    streams = [_package_documents(root, seen) for root in _package_roots()]
    while streams:
        alive = []
        for stream in streams:
            doc = next(stream, None)
            if doc is not None:
                yield doc
                alive.append(stream)
        streams = alive


def write_sample_corpus(path: str | Path, target_bytes: int = DEFAULT_TARGET_BYTES) -> Path:
    """Write about `target_bytes` of English prose to `path`, one document per line.

    Stops at the first document that reaches the target (or when the environment runs out of
    docstrings); the file is written atomically. Returns the path.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs, written = [], 0
    for doc in iter_sample_documents():
        docs.append(doc + "\n")
        written += len(doc) + 1  # ASCII only: characters are bytes
        if written >= target_bytes:
            break
    if written == 0:
        raise RuntimeError("no installed package has docstrings to build the sample corpus from")
    atomic_write(path, "".join(docs))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sctd_dist.data.sample",
        description="Write the offline sample corpus (English docstring prose, one document per line).",
    )
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--target-bytes", type=int, default=DEFAULT_TARGET_BYTES,
                        help=f"approximate size (default {DEFAULT_TARGET_BYTES})")
    args = parser.parse_args(argv)
    path = write_sample_corpus(args.out, args.target_bytes)
    size = path.stat().st_size
    with open(path, encoding="utf-8") as f:
        docs = sum(1 for _ in f)
    print(f"wrote {path}: {size:,} bytes, {docs:,} documents")


if __name__ == "__main__":
    main()
