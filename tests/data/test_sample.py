"""The embedded sample corpus: offline, deterministic, English prose, one document per line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sctd_dist.data.sample import write_sample_corpus

COMMON = {"the", "of", "a", "to", "is", "and", "in", "be", "this", "that", "for", "if", "it", "are", "with"}


def test_same_bytes_every_run(tmp_path: Path) -> None:
    a = write_sample_corpus(tmp_path / "a.txt", target_bytes=40_000)
    b = write_sample_corpus(tmp_path / "b.txt", target_bytes=40_000)
    assert a.read_bytes() == b.read_bytes()
    size = a.stat().st_size
    longest = max(len(line) for line in a.read_text().splitlines())
    assert 40_000 <= size <= 40_000 + longest + 1


def test_one_english_document_per_line(small_texts: list[str]) -> None:
    assert len(small_texts) > 200
    assert all(line.strip() == line and line for line in small_texts)  # no blank lines, no padding
    assert len(set(small_texts)) == len(small_texts)
    words = " ".join(small_texts).lower().split()
    assert sum(w.strip(".,;:") in COMMON for w in words) / len(words) > 0.15  # English function words
    joined = "\n".join(small_texts)
    assert ">>>" not in joined and "def " not in joined and joined.isascii()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "corpus.txt"
    proc = subprocess.run([sys.executable, "-m", "sctd_dist.data.sample", "--out", str(out),
                           "--target-bytes", "30000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size >= 30_000
    assert "documents" in proc.stdout
    assert out.read_bytes() == write_sample_corpus(tmp_path / "again.txt", 30_000).read_bytes()


def test_drawn_from_fixed_dependency_list() -> None:
    """Installing tools (pytest is installed here) must not change the corpus."""
    from sctd_dist.data.sample import CORPUS_PACKAGES, _package_roots

    names = [root.name for root in _package_roots()]
    assert names == sorted(names) and set(names) <= set(CORPUS_PACKAGES)
    assert {"torch", "transformers", "datasets"} <= set(names) and "_pytest" not in names
