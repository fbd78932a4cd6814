"""The paper-style protocol over a grid of runs: per learning rate, the median over seeds; the
reported learning rate is the one with the best median (mean of the task's metrics on its first
evaluation split); its median and spread over seeds are the task's result."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Sequence


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, mean, standard deviation (0 for one value), min, max and the values themselves."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


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
        return statistics.fmean(first[m]["median"] for m in metric_names)

    best = max(sorted(by_lr), key=score)  # ties: the smallest learning rate
    return {"best_lr": best, "results": by_lr[best], "by_lr": {f"{lr:g}": v for lr, v in by_lr.items()}}


def markdown(tasks: dict[str, dict[str, Any]]) -> str:
    """One row per task, split and metric: median and range over seeds at the chosen learning rate."""
    lines = ["| task | split | metric | median | min - max | seeds | lr | majority class |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        for split, per_metric in t["results"].items():
            majority = t.get("majority_class_accuracy", {}).get(split)
            for metric, s in per_metric.items():
                base = f"{majority:.4f}" if majority is not None and metric == "accuracy" else "-"
                lines.append(f"| {name} | {split} | {metric} | {s['median']:.4f} | {s['min']:.4f} - "
                             f"{s['max']:.4f} | {len(s['values'])} | {t['best_lr']:g} | {base} |")
    return "\n".join(lines)
