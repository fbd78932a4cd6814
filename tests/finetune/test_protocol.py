"""The default protocol learns a small task with a tiny model; a run that learnt nothing is
reported as such (a warning naming the fix, a note next to its score, undefined metrics as null)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sctd_dist.finetune.cli import main
from tests.finetune.conftest import write_jsonl

COMMON = ["--threads", "1", "--no-progress"]
NETWORK = ["socket", "server", "address", "port", "request", "protocol", "connection", "client"]
FILES = ["file", "path", "folder", "directory", "archive", "filename", "disk", "record"]
FILLER = ["the", "returns", "a", "new", "value", "from", "this", "object", "when", "called", "with", "its"]


def _rows(n: int, seed: int) -> list[dict]:
    """A binary task like the one users tried: short sentences, 70% of one class; the label is
    whether the sentence is about the network or about files."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.3)
        words = rng.sample(FILLER, 6) + rng.sample(NETWORK if label else FILES, 2)
        rng.shuffle(words)
        rows.append({"sentence1": " ".join(words), "label": label})
    return rows


def test_the_defaults_learn_a_small_task(exported_model, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(625, 1))
    valid = write_jsonl(tmp_path / "valid.jsonl", _rows(156, 2))
    out = tmp_path / "out"
    # The default protocol (epochs, step floor, batch, warmup, lengths) at one point of its grid:
    # 3 epochs of 625 rows are 60 steps; the floor makes them 300.
    assert main(["--model", str(exported_model), "--train-file", str(train), "--validation-file", str(valid),
                 "--out", str(out), "--learning-rates", "3e-4", "--seeds", "1",
                 "--cache-dir", str(tmp_path / "hf"), *COMMON]) == 0
    task = next(iter(json.loads((out / "results.json").read_text())["tasks"].values()))
    run = task["runs"][0]
    assert run["steps"] == 300
    majority = task["majority_class_accuracy"]["validation"]
    accuracy = task["results"]["validation"]["accuracy"]["median"]
    assert 0.6 < majority < 0.8 and accuracy > majority + 0.1, (accuracy, majority)
    assert not run["eval"]["validation"]["single_prediction"]
    assert "warning" not in capsys.readouterr().err


def _constant(tmp_path: Path, name: str, labels: list) -> tuple[Path, Path]:
    rows = [{"sentence1": "the same sentence every time", "label": label} for label in labels]
    return write_jsonl(tmp_path / f"{name}-train.jsonl", rows), write_jsonl(tmp_path / f"{name}-valid.jsonl", rows)


def test_a_task_it_cannot_learn_warns_and_undefined_metrics_are_null(exported_model, tmp_path, capsys):
    # Every example reads the same: no model can tell the classes (or the values) apart.
    for name, labels in (("classes", [0, 1, 1, 0, 1, 0, 1, 1]), ("values", [0.5, 1.5, 2.0, 4.0, 3.5, 1.0])):
        train, valid = _constant(tmp_path, name, labels)
        out = tmp_path / name
        assert main(["--model", str(exported_model), "--train-file", str(train), "--validation-file", str(valid),
                     "--out", str(out), "--task-name", name, "--learning-rates", "1e-4", "--seeds", "1", "2",
                     "--max-steps", "2", "--cache-dir", str(tmp_path / "hf"), *COMMON]) == 0
        err = capsys.readouterr().err
        one = "class" if name == "classes" else "value"
        warning = f"warning: {name}: 2 run(s) at lr 0.0001 predicted one {one} for every example"
        assert warning in err and "--min-steps" in err and err.count("warning:") == 1, err
        md = (out / "results.md").read_text()
        assert f"2 of 2 runs predicted one {one} for every example" in md
        text = (out / "results.json").read_text()
        json.loads(text)  # strict JSON: no NaN
        r = json.loads(text)["tasks"][name]
        assert all(run["eval"]["validation"]["single_prediction"] for run in r["runs"])
    pearson = r["results"]["validation"]["pearson"]
    assert pearson["median"] is None and pearson["values"] == [None, None] and "NaN" not in text
    assert "| values | validation | pearson | null |" in md
