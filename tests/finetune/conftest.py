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


# ----------------------------------------------------------------------------- official files

# Each GLUE task's official header (None: CoLA has none), where its texts and label go, and its
# label values as the files write them.
GLUE_FORMATS = {
    "CoLA": (None, ["source", "label", "judgement", "sentence"], ["0", "1"]),
    "SST-2": (["sentence", "label"], None, ["0", "1"]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], None, ["0", "1"]),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], None, ["0", "1"]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], None, ["0.000", "2.500", "3.800", "5.000"]),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"], None,
             ["contradiction", "entailment", "neutral"]),
    "QNLI": (["index", "question", "sentence", "label"], None, ["entailment", "not_entailment"]),
    "RTE": (["index", "sentence1", "sentence2", "label"], None, ["entailment", "not_entailment"]),
    "WNLI": (["index", "sentence1", "sentence2", "label"], None, ["0", "1"]),
}
TEXT_COLUMNS = {"sentence", "#1 String", "#2 String", "question1", "question2", "sentence1", "sentence2",
                "question"}
# Unbalanced quotes, as the real files have: read with quoting they would swallow the next lines.
WORDS = ['the cat "sat', "a dog ran' home", "birds sing at dawn", 'he said "no', "rain fell all day",
         "the river runs north", "she reads a book", "trains leave at noon"]


def _glue_line(header: list[str], row: int, label: str) -> str:
    fields = []
    for k, name in enumerate(header):
        if name in TEXT_COLUMNS:
            fields.append(f"{WORDS[(row + k) % len(WORDS)]} {row}")
        elif name in ("label", "Quality", "is_duplicate", "score", "gold_label", "label1"):
            fields.append(label)
        elif name == "judgement":
            fields.append("" if label == "1" else "*")
        else:
            fields.append(str(row))
    return "\t".join(fields)


def write_glue(root: Path, rows: int = 8) -> dict[str, dict[str, list[str]]]:
    """Every GLUE task in its official layout under `root` (train.tsv and dev.tsv; MNLI's
    dev_matched.tsv and dev_mismatched.tsv); returns {folder: {file: labels written}}."""
    written: dict[str, dict[str, list[str]]] = {}
    for folder, (header, columns, labels) in GLUE_FORMATS.items():
        names = ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"] if folder == "MNLI" else ["train.tsv", "dev.tsv"]
        (root / folder).mkdir(parents=True, exist_ok=True)
        written[folder] = {}
        for f, name in enumerate(names):
            head = header or columns
            if folder == "MNLI" and name != "train.tsv":  # dev files carry five annotator labels
                head = head[:-2] + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
            chosen = [labels[(i + f) % len(labels)] for i in range(rows)]
            lines = [_glue_line(head, i, label) for i, label in enumerate(chosen)]
            text = "\n".join(([] if header is None else ["\t".join(head)]) + lines) + "\n"
            (root / folder / name).write_text(text)
            written[folder][name] = chosen
    return written


def long_context_squad(path: Path, version: str, words: int = 300) -> Path:
    """A SQuAD-format file whose contexts are longer than one 384-token window, with answers
    near the start, in the middle and at the end (v2.0: one unanswerable question too)."""
    filler = " ".join(f"{WORDS[i % len(WORDS)].replace(chr(34), '')} number {i}." for i in range(words // 6))
    context = f"Alice wrote the report in 2019. {filler} The river Seine reaches the sea at Le Havre. {filler} " \
              "Bob reviewed it a year later."
    questions = [("Who wrote the report?", "Alice"), ("Where does the Seine reach the sea?", "Le Havre"),
                 ("Who reviewed the report?", "Bob")]
    if version == "v2.0":
        questions.append(("Who painted the picture?", None))
    qas = []
    for n, (question, answer) in enumerate(questions):
        if answer is None:
            qas.append({"id": f"{version}-q{n}", "question": question, "answers": [], "is_impossible": True})
        else:
            qas.append({"id": f"{version}-q{n}", "question": question,
                        "answers": [{"text": answer, "answer_start": context.index(answer)}]})
    path.write_text(json.dumps({"version": version, "data": [{"title": "long", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path
