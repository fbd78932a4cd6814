"""Metrics against scikit-learn / scipy and hand-computed values; SQuAD scoring and answer
selection on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from sctd_dist.finetune import metrics
from sctd_dist.finetune.qa import apply_threshold, best_answers
from sctd_dist.finetune.summary import spread, summarize_task

PRED = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
GOLD = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]


def test_classification_metrics_equal_sklearn_and_hand_values():
    got = metrics.compute(["accuracy", "f1", "matthews_correlation"], PRED, GOLD)
    assert got["accuracy"] == skm.accuracy_score(GOLD, PRED) == 0.7
    # tp=4, fp=2, fn=1: precision 2/3, recall 4/5
    assert got["f1"] == pytest.approx(skm.f1_score(GOLD, PRED)) and got["f1"] == pytest.approx(8 / 11)
    mcc = (4 * 3 - 2 * 1) / np.sqrt(6 * 5 * 5 * 4)  # (tp*tn - fp*fn) / sqrt(...)
    assert got["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(GOLD, PRED)) == pytest.approx(mcc)
    assert metrics.majority_accuracy([0, 1, 1, 2], [1, 1, 0, 2]) == 0.5


def test_regression_metrics_equal_scipy():
    pred = [0.1, 2.0, 2.5, 3.9, 5.0, 1.0]
    gold = [0.0, 1.8, 3.0, 4.0, 4.6, 1.5]
    got = metrics.compute(["pearson", "spearmanr"], pred, gold)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert got["spearmanr"] == pytest.approx(stats.spearmanr(pred, gold)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),  # case, article, punctuation
    ("in  Paris,  France", "Paris France", 0.0, 0.8),  # 2 of 3 predicted tokens: P 2/3, R 1
    ("Paris", "London", 0.0, 0.0),
    ("", "", 1.0, 1.0),  # no answer predicted for an unanswerable question
    ("Paris", "", 0.0, 0.0),
    ("an apple a day", "apple day", 1.0, 1.0),
])
def test_squad_exact_and_f1_hand_made(pred, gold, em, f1):
    assert metrics.squad_exact(pred, gold) == em
    assert metrics.squad_f1(pred, gold) == pytest.approx(f1)


def test_squad_metrics_take_the_best_gold_answer_and_split_no_answer():
    answers = {"a": ["Seine river", "the Seine"], "b": [], "c": ["2019"]}
    got = metrics.squad_metrics({"a": "Seine", "b": "", "c": "in 2020"}, answers)
    assert got["exact_match"] == pytest.approx(100 * 2 / 3)  # a: "the Seine" -> "seine"; b: empty = empty
    assert got["f1"] == pytest.approx(100 * 2 / 3)  # c shares no token
    assert got["no_answer_exact_match"] == 100.0 and got["has_answer_exact_match"] == 50.0
    with pytest.raises(ValueError, match="no prediction"):
        metrics.squad_metrics({"a": "x"}, answers)


CONTEXT = "Alice met Bob in Paris."
# token offsets of "[CLS] who met bob ? [SEP] alice met bob in paris . [SEP]": question tokens off-context
OFFSETS = [[-1, -1]] * 6 + [[0, 5], [6, 9], [10, 13], [14, 16], [17, 22], [22, 23], [-1, -1]]


def _logits(start_at: int, end_at: int, null: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    s, e = np.full(len(OFFSETS), -5.0), np.full(len(OFFSETS), -5.0)
    s[start_at], e[end_at] = 3.0, 3.0
    s[0] = e[0] = null
    return s, e


def test_best_span_and_no_answer_decision():
    s, e = _logits(6, 6)
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e]) == {"q": "Alice"}
    s, e = _logits(10, 11)  # a span may end on punctuation; text comes from the context's characters
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e]) == {"q": "Paris."}
    # Null score 2*4=8 beats the best span 3+3=6: v2 answers nothing, v1 still answers.
    s, e = _logits(6, 6, null=4.0)
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e], with_negative=True) == {"q": ""}
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e], with_negative=False) == {"q": "Alice"}
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e], with_negative=True,
                        null_score_diff_threshold=3.0) == {"q": "Alice"}
    # Spans longer than max_answer_length, reversed, or on question tokens are never chosen.
    s, e = _logits(6, 10)
    s[2], e[3] = 9.0, 9.0  # the question's tokens score highest
    whole = {"q": "Alice met Bob in Paris"}
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e], max_answer_length=5) == whole
    assert best_answers({"q": CONTEXT}, ["q"], [OFFSETS], [s], [e], max_answer_length=2) != whole


def test_answer_from_the_best_of_several_windows():
    weak, strong = _logits(7, 7), _logits(8, 8)
    strong = (strong[0] * 2, strong[1] * 2)
    got = best_answers({"q": CONTEXT}, ["q", "q"], [OFFSETS, OFFSETS], [weak[0], strong[0]], [weak[1], strong[1]])
    assert got == {"q": "Bob"}


def test_protocol_picks_the_learning_rate_by_median_over_seeds():
    def run(lr, seed, acc):
        return {"lr": lr, "seed": seed, "eval": {"validation": {"metrics": {"accuracy": acc}}}}

    runs = [run(1e-4, 1, 0.9), run(1e-4, 2, 0.5), run(1e-4, 3, 0.55),  # median 0.55, one lucky seed
            run(3e-4, 1, 0.6), run(3e-4, 2, 0.62), run(3e-4, 3, 0.58)]  # median 0.60
    got = summarize_task(runs, ["accuracy"])
    assert got["best_lr"] == 3e-4
    assert got["results"]["validation"]["accuracy"] == spread([0.6, 0.62, 0.58])
    assert got["by_lr"]["0.0001"]["validation"]["accuracy"]["median"] == 0.55


def test_glue_score_is_the_leaderboard_average():
    # BERT-large's published test-set numbers; the leaderboard shows its score as 80.5.
    r = {"cola": {"v": {"matthews_correlation": 0.605}}, "sst2": {"v": {"accuracy": 0.949}},
         "mrpc": {"v": {"f1": 0.893, "accuracy": 0.854}}, "stsb": {"v": {"pearson": 0.876, "spearmanr": 0.865}},
         "qqp": {"v": {"f1": 0.721, "accuracy": 0.893}},
         "mnli": {"validation_matched": {"accuracy": 0.867}, "validation_mismatched": {"accuracy": 0.859}},
         "qnli": {"v": {"accuracy": 0.927}}, "rte": {"v": {"accuracy": 0.701}}, "wnli": {"v": {"accuracy": 0.651}}}
    got = metrics.glue_score(r)
    # By hand: MRPC (89.3+85.4)/2, STS-B (87.6+86.5)/2, QQP (72.1+89.3)/2, MNLI (86.7+85.9)/2, nine tasks.
    by_hand = (60.5 + 94.9 + 87.35 + 87.05 + 80.7 + 86.3 + 92.7 + 70.1 + 65.1) / 9
    assert got["glue"] == pytest.approx(by_hand) and round(got["glue"], 1) == 80.5
    assert got["mnli"] == pytest.approx(86.3) and got["mrpc"] == pytest.approx(87.35)
    assert metrics.glue_score({k: v for k, v in r.items() if k != "wnli"}) is None  # not all there
    assert metrics.glue_score({**r, "cola": {"v": {"matthews_correlation": None}}}) is None


def test_squad_v1_scores_equal_the_official_definitions_by_hand():
    golds = {"a": ["Denver Broncos", "The Denver Broncos"], "b": ["Santa Clara, California"],
             "c": ["gold"], "d": ["an era of 50 years"]}
    preds = {"a": "the Denver Broncos!", "b": "Santa Clara", "c": "golden", "d": "era of fifty years"}
    got = metrics.squad_metrics(preds, golds)
    # a: exact after normalisation; b: "santa clara" vs "santa clara california": P 1, R 2/3 -> 0.8;
    # c: no common token; d: "era of fifty years" vs "era of 50 years": 3 common, P = R = 3/4.
    assert got == {"exact_match": pytest.approx(25.0), "f1": pytest.approx(100 * (1 + 0.8 + 0 + 0.75) / 4)}


def test_squad_v2_best_threshold_by_hand():
    golds = {"q1": ["Paris"], "q2": [], "q3": ["the Seine river"], "q4": []}
    # (best span, no-answer score minus the span's score)
    spans = {"q1": ("Paris", -2.0), "q3": ("Seine", 1.0), "q2": ("London", 3.0), "q4": ("x", 5.0)}
    answers = apply_threshold(spans, with_negative=True, null_score_diff_threshold=0.0)
    assert answers == {"q1": "Paris", "q3": "", "q2": "", "q4": ""}
    at_zero = metrics.squad_metrics(answers, golds)
    assert at_zero["exact_match"] == 75.0 and at_zero["f1"] == 75.0  # q3 unanswered
    best = metrics.squad_best_threshold(spans, golds)
    # Start with everything unanswered: 2 of 4 right. By margin: q1 +1 (3), q3 +0 EM / +2/3 F1, q2 -1, q4 -1.
    assert best["best_exact_match"] == 75.0 and best["best_exact_match_threshold"] == -2.0
    assert best["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and best["best_f1_threshold"] == 1.0


def test_an_undefined_metric_loses_the_selection_and_is_null():
    def run(lr, seed, value):
        return {"lr": lr, "seed": seed, "eval": {"validation": {"metrics": {"pearson": value}}}}

    nan = float("nan")
    runs = [run(1e-4, 1, nan), run(1e-4, 2, nan), run(3e-4, 1, -0.2), run(3e-4, 2, nan), run(3e-4, 3, 0.1)]
    got = summarize_task(runs, ["pearson"])
    assert got["best_lr"] == 3e-4  # a defined median beats an undefined one, even a negative median
    assert got["results"]["validation"]["pearson"]["median"] == -0.2  # undefined ranks lowest
    assert got["results"]["validation"]["pearson"]["undefined"] == 1
    undefined = got["by_lr"]["0.0001"]["validation"]["pearson"]
    assert undefined["median"] is None and undefined["mean"] is None and undefined["undefined"] == 2
    assert np.isnan(metrics.pearson([1.0, 1.0, 1.0], [0.1, 0.5, 0.9]))  # a constant prediction
