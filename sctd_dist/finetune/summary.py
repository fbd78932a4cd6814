"""The paper-style protocol over a grid of runs: per learning rate, the median over seeds; the
reported learning rate is the one with the best median (mean of the task's metrics on its first
evaluation split); its median and spread over seeds are the task's result.

An undefined metric (NaN: a correlation of a constant prediction) ranks below every number: it
never wins the selection, and it is written as null (JSON has no NaN)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Sequence


def _defined(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median (undefined values rank lowest), and over the defined values mean, standard deviation
    (0 for one value), min and max; `undefined` counts the others. None where nothing is defined."""
    values = [float(v) if _defined(v) else math.nan for v in values]
    finite = [v for v in values if math.isfinite(v)]
    median = statistics.median([v if math.isfinite(v) else -math.inf for v in values])
    out: dict[str, Any] = {"median": median if math.isfinite(median) else None,
                           "mean": statistics.fmean(finite) if finite else None,
                           "std": (statistics.stdev(finite) if len(finite) > 1 else 0.0) if finite else None,
                           "min": min(finite) if finite else None, "max": max(finite) if finite else None,
                           "values": values}
    if len(finite) < len(values):
        out["undefined"] = len(values) - len(finite)
    return out


def _by_split(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in runs[0]["eval"]:
        names = runs[0]["eval"][split]["metrics"]
        out[split] = {m: spread([r["eval"][split]["metrics"][m] for r in runs]) for m in names}
    return out


def summarize_task(runs: list[dict[str, Any]], metric_names: Sequence[str]) -> dict[str, Any]:
    """{best_lr, results: {split: {metric: spread}}, by_lr: {lr: ...}} of one task's runs."""
    grouped: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        grouped[r["lr"]].append(r)
    by_lr = {lr: _by_split(sorted(rs, key=lambda r: r["seed"])) for lr, rs in sorted(grouped.items())}

    def score(lr: float) -> float:
        first = next(iter(by_lr[lr].values()))
        medians = [first[m]["median"] for m in metric_names]
        return statistics.fmean(medians) if all(_defined(m) for m in medians) else -math.inf

    best = max(sorted(by_lr), key=score)  # ties: the smallest learning rate
    return {"best_lr": best, "results": by_lr[best], "by_lr": {f"{lr:g}": v for lr, v in by_lr.items()}}


def collapsed_runs(runs: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """The runs at `lr` that predicted one class for every example (or one value for every example
    of a regression task) on some evaluation split."""
    return [r for r in runs if r["lr"] == lr
            and any(e.get("single_prediction") for e in r["eval"].values())]


def _number(value: float | None) -> str:
    return f"{value:.4f}" if _defined(value) else "null"


def markdown(tasks: dict[str, dict[str, Any]]) -> str:
    """One row per task, split and metric: median and range over seeds at the chosen learning rate;
    the note says when runs there predicted a single class (a failure, not a score)."""
    lines = ["| task | split | metric | median | min - max | seeds | lr | majority class | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        runs = t.get("runs", [])
        collapsed = len(collapsed_runs(runs, t["best_lr"]))
        at_lr = sum(1 for r in runs if r["lr"] == t["best_lr"])
        one = "value" if t.get("kind") == "regression" else "class"
        note = f"{collapsed} of {at_lr} runs predicted one {one} for every example" if collapsed else ""
        for split, per_metric in t["results"].items():
            majority = t.get("majority_class_accuracy", {}).get(split)
            for metric, s in per_metric.items():
                base = f"{majority:.4f}" if majority is not None and metric == "accuracy" else "-"
                undefined = f"; {s['undefined']} undefined" if s.get("undefined") else ""
                lines.append(f"| {name} | {split} | {metric} | {_number(s['median'])} | {_number(s['min'])} - "
                             f"{_number(s['max'])} | {len(s['values'])} | {t['best_lr']:g} | {base} | "
                             f"{note}{undefined} |")
    return "\n".join(lines)
