"""Downstream metrics under their GLUE / SQuAD names.

Classification and regression metrics come from scikit-learn and scipy (the same definitions
GLUE's official scorer uses); only SQuAD's answer normalisation, exact match and token F1 are
written here, because no maintained library ships them without downloading a metric script.
GLUE metrics are fractions in [0, 1] (Matthews and Pearson/Spearman in [-1, 1]); SQuAD's are
percentages, as in the official evaluation scripts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Mapping, Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "exact_match")


def accuracy(predictions: Sequence, references: Sequence) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Binary F1 of the positive class 1 (GLUE's F1 for MRPC and QQP)."""
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions: Sequence, references: Sequence) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def is_constant(values: Sequence[float]) -> bool:
    """One value throughout, up to float rounding (a batch's rows may round differently)."""
    x = np.asarray(values, float)
    return x.size == 0 or float(np.ptp(x)) <= 1e-6 * max(1.0, float(np.abs(x).max()))


def _correlation(fn, predictions: Sequence[float], references: Sequence[float]) -> float:
    """A correlation; NaN (undefined) when either side is constant, as for a model that predicts
    one value for every example."""
    x, y = np.asarray(predictions, float), np.asarray(references, float)
    if is_constant(x) or is_constant(y):
        return float("nan")
    return float(fn(x, y)[0])


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, references)


def spearmanr(predictions: Sequence[float], references: Sequence[float]) -> float:
    from scipy.stats import spearmanr as scipy_spearmanr

    return _correlation(scipy_spearmanr, predictions, references)


CLASSIFICATION_METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
    "pearson": pearson, "spearmanr": spearmanr,
}


def compute(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{name: value} for classification/regression metric `names`."""
    return {name: CLASSIFICATION_METRICS[name](predictions, references) for name in names}


def majority_accuracy(train_labels: Sequence, eval_labels: Sequence) -> float:
    """Accuracy of always predicting the most frequent training label (ties: the smallest label)."""
    counts = Counter(train_labels)
    top = max(sorted(counts), key=lambda label: counts[label])
    return sum(1 for label in eval_labels if label == top) / max(len(eval_labels), 1)


# ----------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (official evaluate-v1.1.py / evaluate-v2.0.py): lower case,
    drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of normalised answers; an empty answer (SQuAD v2's "no answer") scores 1
    only against another empty answer (official evaluate-v2.0.py)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """`exact_match` and `f1` (percent) over the questions in `answers`: the best score over each
    question's gold answers; a question with no gold answer (SQuAD v2) expects the empty answer.
    With unanswerable questions present, the answerable and unanswerable parts are reported too."""
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for question(s) {missing[:5]}")
    em, f1s, has = [], [], []
    for qid, golds in answers.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em.append(max(squad_exact(predictions[qid], g) for g in golds))
        f1s.append(max(squad_f1(predictions[qid], g) for g in golds))
        has.append(golds != [""])
    out = {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1s))}
    if not all(has):
        has_arr = np.asarray(has)
        for name, values in (("exact_match", em), ("f1", f1s)):
            v = np.asarray(values)
            if has_arr.any():
                out[f"has_answer_{name}"] = 100.0 * float(v[has_arr].mean())
            out[f"no_answer_{name}"] = 100.0 * float(v[~has_arr].mean())
    return out


def squad_best_threshold(spans: Mapping[str, tuple[str, float]],
                         answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v2's best no-answer threshold on this set (as the official evaluate-v2.0.py finds it):
    questions sorted by their no-answer margin; answering those up to a margin with their best
    span and the rest with "" scores the running sum below; the best sum and its margin are
    reported for exact match and for F1 (percent)."""
    out: dict[str, float] = {}
    has = {qid: any(normalize_answer(g) for g in golds) for qid, golds in answers.items()}
    order = sorted(answers, key=lambda qid: spans[qid][1])
    for name, score in (("exact_match", squad_exact), ("f1", squad_f1)):
        current = best = float(sum(1 for qid in answers if not has[qid]))  # all answered ""
        threshold = 0.0
        for qid in order:
            text, margin = spans[qid]
            if has[qid]:
                current += max(score(text, g) for g in answers[qid])
            elif text:
                current -= 1.0
            if current > best:
                best, threshold = current, margin
        out[f"best_{name}"] = 100.0 * best / max(len(answers), 1)
        out[f"best_{name}_threshold"] = threshold
    return out


# ----------------------------------------------------------------------------- GLUE score

# The leaderboard's score of a task (Wang et al. 2019): its official metric, or the mean of its two;
# MNLI's matched and mismatched accuracies are averaged into one task (that reproduces the
# leaderboard's scores, e.g. BERT-large 80.5 from its published per-task numbers).
GLUE_TASK_METRICS = {"cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
                     "stsb": ("pearson", "spearmanr"), "qqp": ("f1", "accuracy"), "qnli": ("accuracy",),
                     "rte": ("accuracy",), "wnli": ("accuracy",)}
MNLI_SPLITS = ("validation_matched", "validation_mismatched")


def glue_score(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float] | None:
    """{task: score, "glue": average} in percent from {task: {split: {metric: value}}}, or None
    when a GLUE task is absent or one of its values is undefined (NaN or None)."""
    per_task: dict[str, float] = {}
    for task, names in {**GLUE_TASK_METRICS, "mnli": ("accuracy",)}.items():
        if task not in results:
            return None
        splits = MNLI_SPLITS if task == "mnli" else (next(iter(results[task])),)
        values = [results[task].get(split, {}).get(name) for split in splits for name in names]
        if any(v is None or not np.isfinite(v) for v in values):
            return None
        per_task[task] = 100.0 * float(np.mean(values))
    return {**per_task, "glue": float(np.mean(list(per_task.values())))}
