"""Tokenised features of a task, written once to disk and read by every fine-tuning job.

Jobs may run in other processes (one per GPU), so the features live in `datasets`' own on-disk
format (`save_to_disk`, memory-mapped on load) rather than in pickled Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sctd_dist.finetune import qa
from sctd_dist.finetune.tasks import TaskData

if TYPE_CHECKING:
    from sctd_dist.finetune.config import FinetuneConfig

MODEL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


def _classification(ds, tokenizer, data: TaskData, max_length: int):
    label_ids = {v: i for i, v in enumerate(data.labels or [])}
    pair = data.spec.is_pair

    def fn(batch: dict[str, list]) -> dict[str, Any]:
        texts = (batch["sentence1"], batch["sentence2"]) if pair else (batch["sentence1"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = ([float(v) for v in batch["label"]] if data.spec.kind == "regression"
                         else [label_ids[v] for v in batch["label"]])
        return enc

    return ds.map(fn, batched=True, remove_columns=ds.column_names)


def write_features(data: TaskData, tokenizer, out: Path, cfg: FinetuneConfig) -> Path:
    """Tokenise the train and evaluation splits into `out` (`train/`, `eval-<split>/`, and for QA
    `examples-<split>/`) with the lengths of `cfg`; returns `out`."""
    out = Path(out)
    if data.spec.kind == "qa":
        window = (cfg.qa_max_seq_length, cfg.doc_stride, cfg.max_query_length)
        qa.train_features(data.train, tokenizer, *window).save_to_disk(out / "train")
        for split, ds in data.evals.items():
            qa.eval_features(ds, tokenizer, *window).save_to_disk(out / f"eval-{split}")
            ds.select_columns(["id", "context", "answers"]).save_to_disk(out / f"examples-{split}")
    else:
        _classification(data.train, tokenizer, data, cfg.max_seq_length).save_to_disk(out / "train")
        for split, ds in data.evals.items():
            _classification(ds, tokenizer, data, cfg.max_seq_length).save_to_disk(out / f"eval-{split}")
    return out


def read_split(features_dir: Path, name: str):
    from datasets import load_from_disk

    return load_from_disk(str(Path(features_dir) / name))
