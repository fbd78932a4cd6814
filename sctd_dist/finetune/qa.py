"""Extractive question answering: SQuAD examples -> model features, and logits -> answer text.

A context longer than the model's window is cut into overlapping windows (`doc_stride` tokens of
overlap), each a feature. Training labels a window with the answer's first and last token, or
with [CLS] (position 0) when the answer is not inside it or the question has none (SQuAD v2).
At evaluation every window proposes its best spans; an example's answer is its best-scoring
span over all windows, and with unanswerable questions allowed it answers "" when the no-answer
score ([CLS] start + end, the lowest over its windows) beats the best span by more than a
threshold (the rule of the BERT reference implementation's run_squad).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

NO_OFFSET = (-1, -1)  # a token outside the context: never part of an answer


def _truncate_questions(questions: Sequence[str], tokenizer, max_query_length: int) -> list[str]:
    """Questions cut to `max_query_length` tokens, so the context always has room."""
    stripped = [q.lstrip() for q in questions]
    enc = tokenizer(stripped, add_special_tokens=False, truncation=True, max_length=max_query_length,
                    return_offsets_mapping=True)
    return [q[: offsets[-1][1]] if offsets else q for q, offsets in zip(stripped, enc["offset_mapping"])]


def _encode(batch: dict[str, list], tokenizer, max_length: int, doc_stride: int, max_query_length: int):
    questions = _truncate_questions(batch["question"], tokenizer, max_query_length)
    return tokenizer(questions, batch["context"], truncation="only_second", max_length=max_length,
                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    return first, last


def train_features(examples, tokenizer, max_length: int, doc_stride: int, max_query_length: int = 64):
    """Training features with `start_positions` / `end_positions`."""

    def fn(batch):
        enc = _encode(batch, tokenizer, max_length, doc_stride, max_query_length)
        starts, ends = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][i]]
            first, last = _context_range(enc.sequence_ids(i))
            start = end = 0
            if answers["text"]:
                a_start = answers["answer_start"][0]
                a_end = a_start + len(answers["text"][0])
                if offsets[first][0] <= a_start and offsets[last][1] >= a_end:
                    start = first
                    while start <= last and offsets[start][1] <= a_start:
                        start += 1
                    end = last
                    while end >= first and offsets[end][0] >= a_end:
                        end -= 1
            starts.append(start)
            ends.append(end)
        enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        enc["start_positions"], enc["end_positions"] = starts, ends
        return enc

    return examples.map(fn, batched=True, remove_columns=examples.column_names)


def eval_features(examples, tokenizer, max_length: int, doc_stride: int, max_query_length: int = 64):
    """Evaluation features with `example_id` and context-only `offset_mapping`."""

    def fn(batch):
        enc = _encode(batch, tokenizer, max_length, doc_stride, max_query_length)
        ids, offsets_out = [], []
        for i, offsets in enumerate(enc["offset_mapping"]):
            ids.append(batch["id"][enc["overflow_to_sample_mapping"][i]])
            seq = enc.sequence_ids(i)
            offsets_out.append([list(o) if seq[k] == 1 else list(NO_OFFSET) for k, o in enumerate(offsets)])
        enc["offset_mapping"] = offsets_out
        enc["example_id"] = ids
        enc.pop("overflow_to_sample_mapping")
        return enc

    return examples.map(fn, batched=True, remove_columns=examples.column_names)


def best_spans(contexts: dict[str, str], example_ids: Sequence[str], offsets: Sequence[Sequence[Sequence[int]]],
               start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], *, n_best: int = 20,
               max_answer_length: int = 30) -> dict[str, tuple[str, float]]:
    """{question id: (text of its best span, no-answer score minus that span's score)}: the span
    over all its windows (inf when no window has a valid span)."""
    features: dict[str, list[int]] = defaultdict(list)
    for i, qid in enumerate(example_ids):
        features[qid].append(i)
    spans: dict[str, tuple[str, float]] = {}
    for qid, context in contexts.items():
        best_score, best_text = -np.inf, ""
        null_score = np.inf
        for i in features.get(qid, []):
            s, e, off = np.asarray(start_logits[i]), np.asarray(end_logits[i]), offsets[i]
            null_score = min(null_score, float(s[0] + e[0]))
            length = min(len(off), len(s))
            top_s = np.argsort(s[:length])[::-1][:n_best]
            top_e = np.argsort(e[:length])[::-1][:n_best]
            for a in top_s:
                if off[a][0] < 0:
                    continue
                for b in top_e:
                    if off[b][0] < 0 or b < a or b - a + 1 > max_answer_length:
                        continue
                    score = float(s[a] + e[b])
                    if score > best_score:
                        best_score, best_text = score, context[off[a][0]:off[b][1]]
        spans[qid] = (best_text, float(null_score - best_score) if best_score > -np.inf else np.inf)
    return spans


def apply_threshold(spans: dict[str, tuple[str, float]], with_negative: bool,
                    null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """The answer of each question: its best span, or "" (SQuAD v2) when the no-answer score
    beats the span by more than the threshold."""
    return {qid: "" if with_negative and diff > null_score_diff_threshold else text
            for qid, (text, diff) in spans.items()}


def best_answers(contexts: dict[str, str], example_ids: Sequence[str], offsets: Sequence[Sequence[Sequence[int]]],
                 start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], *, n_best: int = 20,
                 max_answer_length: int = 30, with_negative: bool = False,
                 null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """The answer text of each example from its features' logits (see the module docstring)."""
    spans = best_spans(contexts, example_ids, offsets, start_logits, end_logits, n_best=n_best,
                       max_answer_length=max_answer_length)
    return apply_threshold(spans, with_negative, null_score_diff_threshold)


def gold_answers(examples) -> dict[str, list[str]]:
    return {qid: list(a["text"]) for qid, a in zip(examples["id"], examples["answers"])}


def contexts_of(examples) -> dict[str, Any]:
    return dict(zip(examples["id"], examples["context"]))
