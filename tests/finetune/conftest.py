"""Shared fixtures of the fine-tuning tests: one tiny model pretrained by a short real run (its
checkpoint and its export), the offline suite, a hand-made SQuAD file. Each is built once per
test session and shared by every xdist worker (a file lock: one builds, the others reuse)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import SEQ

PRETRAIN_STEPS = 30


def _shared(tmp_path_factory, name: str) -> tuple[Path, object]:
    from filelock import FileLock

    # Under xdist the parent of the worker's base folder is this session's, shared by all workers;
    # without xdist it would outlive the session, so the base folder itself is used.
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sctd-finetune"
    root.mkdir(parents=True, exist_ok=True)
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory, data_dir) -> Path:
    """The --save folder of a 30-step ScTD run of the tiny model on the sample corpus (1 rank)."""
    from tests.training import launch

    out, lock = _shared(tmp_path_factory, "pretrain")
    with lock:
        if not (out / "ckpt" / "latest").is_file():
            launch.train(1, "--data-path", str(data_dir), "--seq-length", str(SEQ), "--token-drop", "sctd",
                         "--train-iters", str(PRETRAIN_STEPS), "--global-batch-size", "8",
                         "--micro-batch-size", "8", "--eval-iters", "0", "--save", str(out / "ckpt"),
                         "--no-progress")
    return out / "ckpt"


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, pretrained_checkpoint) -> Path:
    """The checkpoint exported to a Hugging Face folder (sctd_dist.export)."""
    from sctd_dist.export import export

    out, lock = _shared(tmp_path_factory, "hf")
    with lock:
        if not (out / "config.json").is_file():
            export(pretrained_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def offline_suite(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The offline suite as jsonl files: {task: {split: path}}."""
    from sctd_dist.data.downstream import SPLITS, TASKS, write_suite

    out, lock = _shared(tmp_path_factory, "suite")
    with lock:
        if not all((out / t / f"{s}.jsonl").is_file() for t in TASKS for s in SPLITS):
            write_suite(out)
    return {t: {s: out / t / f"{s}.jsonl" for s in SPLITS} for t in TASKS}


# Hand-made SQuAD v2 questions: answerable ones (answer text, occurrence in the context) and
# unanswerable ones (None).
SQUAD_ARTICLES = [
    ("Paris is the capital of France. The city lies on the river Seine, which flows into the "
     "English Channel at Le Havre.",
     [("What is the capital of France?", "Paris"), ("Which river flows through Paris?", "Seine"),
      ("Where does the Seine reach the sea?", "Le Havre"), ("What is the capital of Spain?", None)]),
    ("The queue module implements multi-producer, multi-consumer queues. It is especially useful in "
     "threaded programming when information must be exchanged safely between multiple threads.",
     [("What does the queue module implement?", "multi-producer, multi-consumer queues"),
      ("Where is the queue module especially useful?", "threaded programming"),
      ("Who wrote the queue module?", None)]),
    ("Alice wrote the report in 2019, and Bob reviewed it a year later before it was published.",
     [("Who wrote the report?", "Alice"), ("Who reviewed the report?", "Bob"),
      ("When was the report written?", "2019"), ("Who painted the picture?", None)]),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line (the run_glue jsonl convention)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_squad(path: Path, articles=SQUAD_ARTICLES) -> Path:
    """A SQuAD v2.0-format file of `articles`."""
    data, n = [], 0
    for i, (context, questions) in enumerate(articles):
        qas = []
        for question, answer in questions:
            n += 1
            if answer is None:
                qas.append({"id": f"q{n}", "question": question, "answers": [], "is_impossible": True})
            else:
                qas.append({"id": f"q{n}", "question": question,
                            "answers": [{"text": answer, "answer_start": context.index(answer)}]})
        data.append({"title": f"article {i}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path
