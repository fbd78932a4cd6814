"""The offline downstream suite: deterministic, balanced, split by source, and free of any text
of the embedded pretraining corpus."""

from __future__ import annotations

import json
from collections import Counter

from sctd_dist.data.downstream import TOPICS, samedoc_task, stdlib_passages, topic_task, write_suite


def _texts(rows: list[dict]) -> set[str]:
    return {r[k] for r in rows for k in ("sentence1", "sentence2") if k in r}


def test_no_passage_of_the_suite_is_in_the_pretraining_corpus(data_dir):
    # The corpus the sample dataset (and so every test model) was pretrained on.
    corpus = (data_dir.parent / "sample_corpus.txt").read_text(encoding="utf-8")
    passages = stdlib_passages()
    assert len(passages) > 3000
    assert not [p.text for p in passages if p.text in corpus]
    # The filter matters: unfiltered, some stdlib paragraphs (vendored by corpus packages) are there.
    unfiltered = stdlib_passages(exclude_corpus_bytes=0)
    assert [p.text for p in unfiltered if p.text in corpus]


def test_tasks_are_balanced_and_split_by_source():
    passages = stdlib_passages()
    topic = topic_task(passages)
    for split, rows in topic.items():
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(TOPICS) and len(set(counts.values())) == 1, (split, counts)
    assert len(topic["train"]) > 1000 and len(topic["validation"]) > 250
    pairs = samedoc_task(passages)
    file_of = {p.text: p.file for p in passages}
    for split, rows in pairs.items():
        share = sum(r["label"] for r in rows) / len(rows)
        assert 0.45 < share < 0.55, (split, share)
        assert all((file_of[r["sentence1"]] == file_of[r["sentence2"]]) == bool(r["label"]) for r in rows)
        assert all(r["sentence1"] != r["sentence2"] for r in rows)
    for task in (topic, pairs):
        assert not _texts(task["train"]) & _texts(task["validation"])
    train_files = {file_of[t] for t in _texts(pairs["train"])}
    assert not train_files & {file_of[t] for t in _texts(pairs["validation"])}


def test_generation_is_deterministic(tmp_path):
    passages = stdlib_passages()
    assert topic_task(passages, seed=0) == topic_task(passages, seed=0)
    assert topic_task(passages, seed=1) != topic_task(passages, seed=0)
    a = write_suite(tmp_path / "a")
    b = write_suite(tmp_path / "b")
    for task, files in a.items():
        for split, path in files.items():
            assert path.read_bytes() == b[task][split].read_bytes()
    row = json.loads(a["stdlib-samedoc"]["train"].read_text().splitlines()[0])
    assert set(row) == {"sentence1", "sentence2", "label"}  # run_glue's columns
