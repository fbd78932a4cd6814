"""Tasks from local files and from a hub-shaped dataset: types, labels and columns."""

from __future__ import annotations

import dataclasses

from sctd_dist.finetune.tasks import NAMED_TASKS, load_hub, load_local
from tests.finetune.conftest import write_jsonl


def test_local_files_infer_the_task_type(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 0.25},
            {"sentence1": "c", "sentence2": "d", "label": 4.0}]
    reg = load_local(write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows),
                     cache_dir=str(tmp_path))
    assert reg.spec.kind == "regression" and reg.spec.metrics == ("pearson", "spearmanr") and reg.spec.is_pair
    words = [{"sentence1": "a", "label": "pos"}, {"sentence1": "b", "label": "neg"}]
    cls = load_local(write_jsonl(tmp_path / "t2.jsonl", words), write_jsonl(tmp_path / "v2.jsonl", words),
                     cache_dir=str(tmp_path))
    assert cls.spec.kind == "classification" and cls.labels == ["neg", "pos"]
    assert cls.spec.metrics == ("accuracy",)


def test_hub_task_columns_are_normalised(tmp_path):
    """A GLUE-shaped dataset (QQP's columns, two splits) read through the hub loader's own
    `datasets.load_dataset` call, from a local folder instead of the hub."""
    import datasets

    folder = tmp_path / "qqp"
    (folder / "data").mkdir(parents=True)
    rows = {"question1": ["how old is it?", "why?"], "question2": ["what age is it?", "how?"],
            "label": [1, 0], "idx": [0, 1]}
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / f"{split}-00000.parquet"))
    spec = dataclasses.replace(NAMED_TASKS["qqp"], hub=(str(folder), None))
    data = load_hub(spec, str(tmp_path / "cache"))
    assert data.train.column_names == ["sentence1", "sentence2", "label"]
    assert data.evals["validation"]["sentence2"] == rows["question2"] and data.labels == [0, 1]
