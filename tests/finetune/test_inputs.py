"""Bad input costs one clear line (exit 2, no traceback) before any training starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sctd_dist.finetune.cli import main
from tests.finetune.conftest import write_jsonl, write_squad


def _fail(capsys, model: Path, out: Path, *args: str) -> str:
    code = main(["--model", str(model), "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not (out / "results.json").exists()
    return err


GOOD = [{"sentence1": "a cat sat", "label": 0}, {"sentence1": "a dog ran", "label": 1}]


def test_missing_file(capsys, exported_model, tmp_path):
    valid = write_jsonl(tmp_path / "valid.jsonl", GOOD)
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(tmp_path / "nope.csv"),
                "--validation-file", str(valid))
    assert "--train-file" in err and "nope.csv" in err and "does not exist" in err


def test_wrong_column_names(capsys, exported_model, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,target\nhello there,1\ngood bye,0\n")
    valid = write_jsonl(tmp_path / "valid.jsonl", GOOD)
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid))
    assert "--train-file" in err and "['text', 'target']" in err and "sentence1" in err and "label" in err


def test_string_labels_for_a_regression_task(capsys, exported_model, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence1\tsentence2\tlabel\na cat\ta dog\t0.5\ntwo cats\tno dog\thigh\n")
    valid = tmp_path / "valid.tsv"
    valid.write_text("sentence1\tsentence2\tlabel\na cat\ta dog\t0.5\n")
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid), "--task-type", "regression")
    assert "regression" in err and "row 2" in err and "'high'" in err


@pytest.mark.parametrize("empty", ["header_only", "zero_bytes"])
def test_an_empty_split(capsys, exported_model, tmp_path, empty):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    if empty == "header_only":
        valid = tmp_path / "valid.csv"
        valid.write_text("sentence1,label\n")
    else:
        valid = tmp_path / "valid.jsonl"
        valid.write_text("")
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid), "--cache-dir", str(tmp_path / "hf"))
    assert err == f"error: --validation-file {valid} has no rows"


def test_validation_label_unknown_to_training(capsys, exported_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"sentence1": "a bird", "label": 7}])
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid), "--cache-dir", str(tmp_path / "hf"))
    assert f"--validation-file {valid}: row 1 column label has 7, a label the training split" in err


def test_squad_answer_not_in_context(capsys, exported_model, tmp_path):
    bad = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "x1", "question": "Where is Paris?", "answers": [{"text": "Spain", "answer_start": 12}]}]}]}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(path),
                "--validation-file", str(path))
    assert "'x1'" in err and "'Spain'" in err


def test_named_task_without_the_hub(capsys, exported_model, tmp_path):
    # The tests run with HF_DATASETS_OFFLINE=1 (tests/conftest.py): GLUE cannot be fetched.
    err = _fail(capsys, exported_model, tmp_path / "out", "--task", "cola", "--cache-dir", str(tmp_path / "hf"))
    assert "--task cola" in err and "nyu-mll/glue" in err and "--train-file" in err


def test_model_folder_that_is_neither_export_nor_checkpoint(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    err = _fail(capsys, tmp_path / "model", tmp_path / "out", "--task", "stdlib-topic")
    assert "neither a Hugging Face folder" in err


@pytest.mark.parametrize("bad, expected", [
    ({"sentence1": "a cat", "sentence2": None, "label": 0}, "row 2 column sentence2 is empty"),
    ({"sentence1": "a cat", "sentence2": 5, "label": 0}, "row 2 column sentence2 holds 5, not text"),
])
def test_a_hole_in_a_text_column_names_file_row_and_column(capsys, exported_model, tmp_path, bad, expected):
    pairs = [{"sentence1": "a dog", "sentence2": "a bird", "label": 1}, bad]
    train = write_jsonl(tmp_path / "train.jsonl", [pairs[0], {**pairs[0], "label": 0}])
    valid = write_jsonl(tmp_path / "valid.jsonl", pairs)
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid), "--cache-dir", str(tmp_path / "hf"))
    assert err == f"error: --validation-file {valid}: {expected}"


def test_an_unlabelled_validation_row_names_file_row_and_column(capsys, exported_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    valid = write_jsonl(tmp_path / "valid.jsonl", [GOOD[0], {"sentence1": "a bird", "label": -1}])
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(train),
                "--validation-file", str(valid), "--cache-dir", str(tmp_path / "hf"))
    assert f"--validation-file {valid}: row 2 column label has -1" in err and "unlabelled test row" in err


@pytest.mark.parametrize("flags, expected", [
    (["--qa-max-seq-length", "128", "--doc-stride", "128"],
     "--doc-stride 128 must be below the context room of a window, 61"),
    (["--qa-max-seq-length", "64", "--max-query-length", "64"], "--qa-max-seq-length 64 leaves no room"),
    (["--qa-max-seq-length", "1024"], "--qa-max-seq-length 1024 exceeds the model's max_position_embeddings 512"),
])
def test_squad_windows_the_tokenizer_would_refuse_are_refused_up_front(capsys, exported_model, tmp_path, flags,
                                                                       expected):
    squad = write_squad(tmp_path / "train.json")
    err = _fail(capsys, exported_model, tmp_path / "out", "--train-file", str(squad), "--validation-file",
                str(squad), *flags)
    assert expected in err
