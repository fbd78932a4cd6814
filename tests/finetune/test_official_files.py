"""GLUE and SQuAD by name from their official files (--data-dir): each task's own columns,
header or none, label names, no quoting; bad lines named by file, line and column."""

from __future__ import annotations

import pytest

from sctd_dist.finetune.official_files import GLUE_LAYOUTS
from sctd_dist.finetune.tasks import GLUE, load_task
from tests.finetune.conftest import WORDS, long_context_squad, write_glue


def test_every_glue_task_reads_from_the_official_layout(tmp_path):
    written = write_glue(tmp_path, rows=8)
    for name in GLUE:
        data = load_task(name, data_dir=tmp_path)
        layout = GLUE_LAYOUTS[name]
        files = written[layout.folder]
        assert data.spec.is_pair == (len(layout.text) == 2), name
        assert len(data.train) == 8, name  # no line swallowed by an unbalanced quote
        assert data.source["files"] == str(tmp_path / layout.folder)
        if name == "stsb":
            assert data.spec.kind == "regression" and data.train["label"][:4] == [0.0, 2.5, 3.8, 5.0]
        else:
            assert data.labels == list(layout.labels) and data.train["label"] == files["train.tsv"], name
        for split, filename in layout.eval_files.items():
            assert split in data.evals, name
            if name != "stsb":
                assert data.evals[split]["label"] == files[filename], (name, split)
    cola = load_task("cola", data_dir=tmp_path)  # no header: the sentence is the 4th field
    assert cola.train["sentence1"][0] == f"{WORDS[3]} 0" and '"' in WORDS[3]
    mrpc = load_task("mrpc", data_dir=tmp_path)  # '#1 String' / '#2 String'
    assert mrpc.train["sentence1"][1] == f"{WORDS[4]} 1" and mrpc.train["sentence2"][1] == f"{WORDS[5]} 1"
    mnli = load_task("mnli", data_dir=tmp_path)
    assert set(mnli.evals) == {"validation_matched", "validation_mismatched"}
    assert mnli.evals["validation_mismatched"]["label"][:2] == ["neutral", "contradiction"]


def test_squad_by_name_from_the_official_files(tmp_path):
    long_context_squad(tmp_path / "train-v1.1.json", "v1.1")
    long_context_squad(tmp_path / "dev-v1.1.json", "v1.1")
    squad = load_task("squad", data_dir=tmp_path)
    assert len(squad.train) == 3 and all(a["text"] for a in squad.evals["validation"]["answers"])
    with pytest.raises(ValueError, match="train-v2.0.json does not exist"):
        load_task("squad_v2", data_dir=tmp_path)


@pytest.mark.parametrize("folder, edit, expected", [
    ("RTE", lambda text: text.replace("\tnot_entailment\n", "\tmaybe\n", 1),
     "line 3 column label: label 'maybe' is not one of ['entailment', 'not_entailment']"),
    ("STS-B", lambda text: text.replace("\t2.500\n", "\thigh\n", 1), "line 3 column score: 'high' is not a number"),
    ("CoLA", lambda text: text.replace("\t1\t", "\tyes\t", 1), "line 2 column #2: label 'yes'"),
    ("MRPC", lambda text: text.replace("#1 String", "String 1"), "missing ['#1 String']"),
])
def test_a_bad_official_file_is_one_line_naming_file_line_and_column(tmp_path, folder, edit, expected):
    write_glue(tmp_path, rows=8)
    path = tmp_path / folder / "train.tsv"
    path.write_text(edit(path.read_text()))
    name = next(n for n, layout in GLUE_LAYOUTS.items() if layout.folder == folder)
    with pytest.raises(ValueError) as err:
        load_task(name, data_dir=tmp_path)
    message = str(err.value)
    assert message.startswith(f"--data-dir: {path}") and expected in message and "\n" not in message
