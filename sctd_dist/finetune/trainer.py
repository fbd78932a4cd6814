"""One fine-tuning job: a task, a learning rate and a seed, trained and evaluated.

The loop is plain PyTorch (AdamW without weight decay on biases and LayerNorm, linear warmup
then linear decay, gradient clipping at 1.0: the BERT fine-tuning recipe); padding is per batch.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sctd_dist.finetune import metrics, qa
from sctd_dist.finetune.config import TrainSettings
from sctd_dist.finetune.features import MODEL_COLUMNS, read_split
from sctd_dist.finetune.weights import ModelSource, load_task_model


@dataclass
class Job:
    """Everything a worker process needs to run one grid point (picklable)."""

    task: str
    kind: str
    num_labels: int
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...]
    version_2_with_negative: bool
    features_dir: Path
    model: ModelSource
    lr: float
    seed: int
    settings: TrainSettings = field(default_factory=TrainSettings)
    tokenizer: Path | None = None  # None: the model folder's
    copy_segment_b: bool = False  # initialise token type 1 from token type 0 (segments.py)

    def describe(self) -> str:
        return f"{self.task} lr={self.lr:g} seed={self.seed}"


def _collator(tokenizer_folder: Path):
    from transformers import DataCollatorWithPadding

    from sctd_dist.data.tokenizer import load_pretrained_tokenizer

    return DataCollatorWithPadding(load_pretrained_tokenizer(tokenizer_folder, local_only=True))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _forward_logits(model, loader, device: torch.device, bf16: bool) -> list[torch.Tensor] | tuple:
    model.eval()
    outs: list = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_COLUMNS}
            with _autocast(device, bf16):
                out = model(**batch)
            if hasattr(out, "start_logits"):
                outs.append((out.start_logits.float().cpu(), out.end_logits.float().cpu()))
            else:
                outs.append(out.logits.float().cpu())
    model.train()
    return outs


def _evaluate_classification(job: Job, model, split: str, collate, device) -> dict[str, Any]:
    ds = read_split(job.features_dir, f"eval-{split}")
    loader = torch.utils.data.DataLoader(ds, batch_size=job.settings.eval_batch_size, collate_fn=collate)
    logits = torch.cat(_forward_logits(model, loader, device, job.settings.bf16))
    references = ds["labels"]
    if job.kind == "regression":
        values = logits.squeeze(-1).tolist()
        return {"metrics": metrics.compute(job.metrics, values, references),
                "single_prediction": metrics.is_constant(values)}
    predictions = logits.argmax(-1).tolist()
    counts = dict(sorted(Counter(predictions).items()))
    return {"metrics": metrics.compute(job.metrics, predictions, references),
            "predicted_class_counts": counts, "single_prediction": len(counts) == 1}


def _evaluate_qa(job: Job, model, split: str, collate, device) -> dict[str, Any]:
    feats = read_split(job.features_dir, f"eval-{split}")
    examples = read_split(job.features_dir, f"examples-{split}")
    loader = torch.utils.data.DataLoader(feats.select_columns(list(MODEL_COLUMNS)),
                                         batch_size=job.settings.eval_batch_size, collate_fn=collate)
    starts, ends = [], []
    for s, e in _forward_logits(model, loader, device, job.settings.bf16):
        starts += list(s.numpy())
        ends += list(e.numpy())
    s = job.settings
    spans = qa.best_spans(qa.contexts_of(examples), feats["example_id"], feats["offset_mapping"], starts, ends,
                          n_best=s.n_best, max_answer_length=s.max_answer_length)
    answers = qa.apply_threshold(spans, job.version_2_with_negative, s.null_score_diff_threshold)
    golds = qa.gold_answers(examples)
    result: dict[str, Any] = {"metrics": metrics.squad_metrics(answers, golds)}
    if job.version_2_with_negative:  # at --null-score-diff-threshold, and at the best one for this set
        result["metrics"].update(metrics.squad_best_threshold(spans, golds))
    result["answered"] = sum(1 for a in answers.values() if a)
    return result


def run_job(job: Job, device: torch.device | str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Fine-tune from the pretrained weights and evaluate on every evaluation split."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup, set_seed

    device = torch.device(device)
    set_seed(job.seed)  # python, numpy and torch: head initialisation, dropout, data order
    model, _ = load_task_model(job.model, job.kind, job.num_labels, copy_segment_b=job.copy_segment_b)
    model.to(device).train()
    collate = _collator(job.tokenizer or job.model.folder)
    train = read_split(job.features_dir, "train")
    generator = torch.Generator().manual_seed(job.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=job.settings.batch_size, shuffle=True,
                                         generator=generator, collate_fn=collate, drop_last=False)
    s = job.settings
    total = s.steps(len(loader))
    opt = _optimizer(model, job.lr, s.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(s.warmup_ratio * total), total)
    step, losses = 0, []
    bar = tqdm(total=total, desc=job.describe(), disable=not progress, leave=False)
    started = time.perf_counter()
    while step < total:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, s.bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update()
            if step >= total:
                break
    bar.close()
    train_s = time.perf_counter() - started
    evaluate = _evaluate_qa if job.kind == "qa" else _evaluate_classification
    evals = {split: evaluate(job, model, split, collate, device) for split in job.eval_splits}
    tail = losses[-max(1, len(losses) // 10):]
    return {"task": job.task, "lr": job.lr, "seed": job.seed, "steps": step, "train_s": round(train_s, 3),
            "final_train_loss": float(np.mean(tail)), "eval": evals, "settings": asdict(s)}
