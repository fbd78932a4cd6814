"""Fine-tuning end to end on the tiny pretrained model: classification beats the majority class,
the pair task runs a grid over two worker processes, QA on a hand-made SQuAD file reports EM/F1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sctd_dist.finetune.cli import main
from tests.finetune.conftest import long_context_squad, write_glue, write_squad

COMMON = ["--threads", "1", "--no-progress"]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_topic_task_from_a_checkpoint_beats_the_majority_class(pretrained_checkpoint, tmp_path):
    out = tmp_path / "out"
    # --model is the checkpoint folder: exported on the fly, weights verified, then fine-tuned.
    assert main(["--model", str(pretrained_checkpoint), "--task", "stdlib-topic", "--out", str(out),
                 "--learning-rates", "1e-3", "--seeds", "1", "--num-train-epochs", "3",
                 "--min-steps", "0", "--max-seq-length", "64", "--cache-dir", str(tmp_path / "hf"), *COMMON]) == 0
    r = _results(out)
    assert r["model"]["tag"] == "global_step30" and r["model"]["step"] == 30
    task = r["tasks"]["stdlib-topic"]
    majority = task["majority_class_accuracy"]["validation"]
    accuracy = task["results"]["validation"]["accuracy"]["median"]
    assert len(task["labels"]) == 5 and majority <= 0.25  # balanced classes
    assert accuracy > majority + 0.15, (accuracy, majority)
    assert len(task["runs"][0]["eval"]["validation"]["predicted_class_counts"]) > 1
    # Only the task head and the pooler (absent from an MLM checkpoint) start fresh.
    assert task["fresh_weights"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                     "classifier.bias", "classifier.weight"]
    assert not any(p.name.startswith(".work") for p in out.iterdir())  # the exported copy is gone


def test_pair_task_grid_over_two_worker_processes(exported_model, offline_suite, tmp_path):
    out = tmp_path / "out"
    files = offline_suite["stdlib-samedoc"]
    assert main(["--model", str(exported_model), "--train-file", str(files["train"]),
                 "--validation-file", str(files["validation"]), "--out", str(out),
                 "--learning-rates", "1e-3", "3e-4", "--seeds", "1", "2", "--max-steps", "3",
                 "--max-train-samples", "48", "--max-eval-samples", "40", "--max-seq-length", "64",
                 "--workers", "2", "--cache-dir", str(tmp_path / "hf"), *COMMON]) == 0
    r = _results(out)
    task = r["tasks"]["stdlib-samedoc"]
    assert r["devices"] == ["cpu", "cpu"]
    assert task["kind"] == "classification" and task["metrics"] == ["accuracy", "f1", "matthews_correlation"]
    assert sorted((run["lr"], run["seed"]) for run in task["runs"]) == [(3e-4, 1), (3e-4, 2), (1e-3, 1), (1e-3, 2)]
    assert all(run["steps"] == 3 for run in task["runs"])
    assert task["best_lr"] in (1e-3, 3e-4) and set(task["by_lr"]) == {"0.001", "0.0003"}
    acc = task["results"]["validation"]["accuracy"]
    assert len(acc["values"]) == 2 and acc["min"] <= acc["median"] <= acc["max"]
    assert all(0.0 <= v <= 1.0 for v in acc["values"])
    best = [run for run in task["runs"] if run["lr"] == task["best_lr"]]
    assert acc["values"] == [run["eval"]["validation"]["metrics"]["accuracy"] for run in best]
    md = (out / "results.md").read_text()
    assert "| stdlib-samedoc | validation | accuracy |" in md and "| stdlib-samedoc | validation | f1 |" in md


def test_squad_v2_hand_made_file_reports_exact_match_and_f1(exported_model, tmp_path):
    train = write_squad(tmp_path / "train.json")
    out = tmp_path / "out"
    # Windows of 32 tokens with a stride of 8: every context is cut into several features.
    assert main(["--model", str(exported_model), "--train-file", str(train), "--validation-file", str(train),
                 "--out", str(out), "--task-name", "handmade", "--learning-rates", "1e-3", "--seeds", "1",
                 "--max-steps", "4", "--qa-max-seq-length", "32", "--doc-stride", "8", "--max-query-length", "12",
                 *COMMON]) == 0
    task = _results(out)["tasks"]["handmade"]
    assert task["kind"] == "qa" and task["fresh_weights"] == ["qa_outputs.bias", "qa_outputs.weight"]
    metrics = task["runs"][0]["eval"]["validation"]["metrics"]
    assert {"exact_match", "f1", "no_answer_exact_match", "has_answer_f1", "best_f1"} <= set(metrics)
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if not k.endswith("_threshold"))
    assert metrics["best_f1"] >= metrics["f1"] and metrics["best_exact_match"] >= metrics["exact_match"]
    assert metrics["f1"] >= metrics["exact_match"]
    assert "| handmade | validation | exact_match |" in (out / "results.md").read_text()


def test_glue_by_name_from_the_official_layout_and_its_score(exported_model, tmp_path):
    write_glue(tmp_path / "glue", rows=8)
    out = tmp_path / "out"
    assert main(["--model", str(exported_model), "--task", "glue", "--data-dir", str(tmp_path / "glue"),
                 "--out", str(out), "--learning-rates", "1e-4", "--seeds", "1", "--max-steps", "1",
                 "--max-seq-length", "32", *COMMON]) == 0
    r = _results(out)
    assert list(r["tasks"]) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    mnli = r["tasks"]["mnli"]["results"]
    assert set(mnli) == {"validation_matched", "validation_mismatched"}
    assert r["tasks"]["mrpc"]["metrics"] == ["accuracy", "f1"] and r["tasks"]["cola"]["metrics"] == [
        "matthews_correlation"] and r["tasks"]["stsb"]["metrics"] == ["pearson", "spearmanr"]
    assert r["tasks"]["mnli"]["labels"] == ["contradiction", "entailment", "neutral"]

    def median(task, metric, split="validation"):
        return r["tasks"][task]["results"][split][metric]["median"]

    by_hand = 100 * (median("cola", "matthews_correlation") + median("sst2", "accuracy")
                     + (median("mrpc", "f1") + median("mrpc", "accuracy")) / 2
                     + (median("stsb", "pearson") + median("stsb", "spearmanr")) / 2
                     + (median("qqp", "f1") + median("qqp", "accuracy")) / 2
                     + (median("mnli", "accuracy", "validation_matched")
                        + median("mnli", "accuracy", "validation_mismatched")) / 2
                     + median("qnli", "accuracy") + median("rte", "accuracy") + median("wnli", "accuracy")) / 9
    assert r["glue_score"]["glue"] == pytest.approx(by_hand)
    assert "GLUE score (dev sets" in (out / "results.md").read_text()


def test_squad_v1_and_v2_by_name_and_as_files_at_the_defaults(exported_model, tmp_path):
    data = tmp_path / "squad"
    data.mkdir()
    for version in ("v1.1", "v2.0"):
        for split in ("train", "dev"):
            long_context_squad(data / f"{split}-{version}.json", version)
    out = tmp_path / "out"
    # Default windows (384 tokens, stride 128, questions up to 64): each context spans several.
    assert main(["--model", str(exported_model), "--task", "squad", "squad_v2", "--data-dir", str(data),
                 "--out", str(out), "--learning-rates", "1e-4", "--seeds", "1", "--max-steps", "1", *COMMON]) == 0
    local = {}
    for version in ("v1.1", "v2.0"):
        assert main(["--model", str(exported_model), "--train-file", str(data / f"train-{version}.json"),
                     "--validation-file", str(data / f"dev-{version}.json"), "--out", str(tmp_path / version),
                     "--task-name", version, "--learning-rates", "1e-4", "--seeds", "1", "--max-steps", "1",
                     *COMMON]) == 0
        local[version] = _results(tmp_path / version)["tasks"][version]
    r = _results(out)
    assert local["v2.0"]["runs"][0]["eval"]["validation"]["metrics"].keys() == \
        r["tasks"]["squad_v2"]["runs"][0]["eval"]["validation"]["metrics"].keys()
    for task in (r["tasks"]["squad"], r["tasks"]["squad_v2"], *local.values()):
        assert task["eval_windows"]["validation"] > task["eval_rows"]["validation"]  # longer than one window
        metrics = task["runs"][0]["eval"]["validation"]["metrics"]
        assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    assert "best_f1_threshold" in r["tasks"]["squad_v2"]["runs"][0]["eval"]["validation"]["metrics"]
    assert "best_f1" not in r["tasks"]["squad"]["runs"][0]["eval"]["validation"]["metrics"]
