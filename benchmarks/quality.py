"""Time to quality: plain BERT, vanilla token dropping and ScTD at an equal wall-clock budget,
over several seeds, then fine-tuned on the offline downstream suite.

Per seed s, one initial model (seeded by s) and the data order of s are shared by the three arms
(`none`, `vanilla`, `sctd`). All arms of all seeds train interleaved in one process
(`convergence.train_interleaved`: the arm that has trained least takes the next step), so load
from other processes slows every arm alike; each gets `--budget-s` seconds of training on its own
clock, with evaluations at `--evals` marks on the same held-out rows (`convergence.Arm.evaluate`:
held-out MLM loss with all tokens, centered [CLS] cosine between the dropping and the full path).
Each arm's final weights are then saved as a Hugging Face folder and fine-tuned on the offline
suite (`sctd_dist.finetune`: weights verified, one learning rate, the arm's seed).

Reported per arm, as mean and spread over seeds: final held-out MLM loss, its mean over the
second half of the evaluations, the centered [CLS] cosine, every downstream metric, and the
training seconds at which the arm first reaches its seed's baseline final held-out loss (linear
interpolation between evaluations; "not reached" when it never does). Two arms differ beyond the
seed spread when their [min, max] ranges over seeds do not overlap.

    python benchmarks/quality.py                      # the CPU study, ~45-60 min on 2 cores (make quality)
    python benchmarks/quality.py --quick              # smoke run, ~3 min
    python benchmarks/quality.py --device cuda --data-path /data/wiki-s128 --layers 12 --hidden 768 \\
        --heads 12 --batch 64 --budget-s 3600 --tasks sst2 mrpc stsb ... # a GPU machine (benchmarks/README.md)

Writes benchmarks/results/quality.json, quality_pretraining.png and quality_downstream.png.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from common import REPO_ROOT, add_common_args, environment, markdown_table, save_figures, setup_torch, write_json
from convergence import (COLORS, LABELS, MODES, Arm, add_study_args, build, late_mean, study_name,
                         train_interleaved)

# (quantity, direction): +1 higher is better, -1 lower is better
PRETRAIN_QUANTITIES = {"final_loss": -1, "late_loss": -1, "cls_cosine_centered": +1, "time_to_baseline_s": -1}
PAIRS = (("vanilla", "none"), ("sctd", "none"), ("sctd", "vanilla"))
_POINTS_KEPT = 200  # training-loss points stored per arm


def first_reach(evals: list[dict[str, Any]], target: float) -> float | None:
    """Training seconds at which the held-out loss first reaches `target`, interpolated linearly
    between the two evaluations around the crossing; None when it never does."""
    for prev, cur in zip(evals, evals[1:]):
        if cur["eval_loss"] <= target:
            if prev["eval_loss"] <= target:
                return prev["train_s"]
            frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - cur["eval_loss"])
            return prev["train_s"] + frac * (cur["train_s"] - prev["train_s"])
    return None


def pretrain(args, device: torch.device) -> tuple[Path, Any, dict[tuple[str, int], Arm], float]:
    """All arms of all seeds, trained interleaved for the budget; returns (data dir, model config,
    {(mode, seed): arm}, wall seconds)."""
    from sctd_dist.model.arch import build_mlm
    from sctd_dist.parallel import initialize

    ctx = initialize(1)
    data_dir, train, model_cfg, _, valid = build(args, device)  # held-out rows: the same for every arm
    arms: dict[tuple[str, int], Arm] = {}
    for seed in args.seeds:
        seeded = copy.copy(args)
        seeded.seed = seed
        loader = build(seeded, device)[3]  # the data order of this seed
        torch.manual_seed(seed)
        state = build_mlm(model_cfg, ctx).state_dict()  # one initialisation per seed
        for mode in MODES:
            arms[(mode, seed)] = Arm(mode, args, model_cfg, train.special_ids, ctx, state, loader, device)
            torch.manual_seed(seed)  # the same dropout stream for the first evaluation of each arm
            arms[(mode, seed)].evaluate(valid)
    wall = train_interleaved({f"{m}/s{s}": a for (m, s), a in arms.items()}, valid, args.budget_s, args.evals,
                             args.progress)
    return Path(data_dir), model_cfg, arms, wall


def finetune(arm: Arm, model_cfg, tokenizer, seed: int, args, work: Path) -> dict[str, Any]:
    """Save the arm's weights as a Hugging Face folder and fine-tune it on `--tasks`; returns
    {task: {metric: value}} on each task's first evaluation split, and under "majority" the
    majority-class accuracy of the classification tasks."""
    from sctd_dist.finetune.cli import run
    from sctd_dist.finetune.config import FinetuneConfig, TrainSettings
    from sctd_dist.hf import gather_hf_state_dict, save_hf

    folder = save_hf(gather_hf_state_dict(arm.model.mlm), model_cfg, work / "model", tokenizer)
    cfg = FinetuneConfig(
        model=folder, out=work / "finetune", tasks=list(args.tasks), learning_rates=[args.ft_lr], seeds=[seed],
        # The study's protocol: a fixed number of epochs, no floor on steps.
        settings=TrainSettings(epochs=args.ft_epochs, min_steps=0, batch_size=args.ft_batch, bf16=args.ft_bf16),
        max_seq_length=args.ft_max_seq_length, max_train_samples=args.ft_max_train_samples,
        max_eval_samples=args.ft_max_eval_samples, device=args.device, workers=1, threads=args.threads,
        cache_dir=args.ft_cache_dir, progress=False)
    tasks = run(cfg, argv=[])["tasks"]
    scores = {name: {m: s["median"] for m, s in next(iter(t["results"].values())).items()}
              for name, t in tasks.items()}
    majority = {name: next(iter(t["majority_class_accuracy"].values()))
                for name, t in tasks.items() if "majority_class_accuracy" in t}
    return {"scores": scores, "majority": majority}


def _arm_record(arm: Arm, args) -> dict[str, Any]:
    every = max(1, len(arm.train_loss) // _POINTS_KEPT)
    return {"steps": arm.step, "train_s": arm.train_s, "samples": arm.step * args.batch, "evals": arm.evals,
            "train_loss": [[round(t, 3), round(l, 5)] for t, l in arm.train_loss[::every]]}


def run(args) -> dict[str, Any]:
    from sctd_dist.data.dataset import load_tokenizer

    from sctd_dist.finetune.tasks import load_task

    device = setup_torch(args)
    if not args.progress:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    for name in args.tasks:  # a task that cannot load fails now, not after the pretraining
        try:
            load_task(name, str(args.ft_cache_dir) if args.ft_cache_dir else None)
        except ValueError as exc:
            raise SystemExit(f"error: --tasks: {exc}") from None
    started = time.perf_counter()
    data_dir, model_cfg, arms, pretrain_wall = pretrain(args, device)
    if args.progress:
        print(f"pretraining done in {pretrain_wall:.0f} s; fine-tuning {len(arms)} models", flush=True)
    tokenizer = load_tokenizer(data_dir)
    records: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    majority: dict[str, float] = {}
    for (mode, seed), arm in arms.items():
        record = _arm_record(arm, args)
        record["cls_cosine_centered"] = arm.evals[-1].get("cls_cosine_centered")
        work = args.workdir / f"{mode}-s{seed}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        downstream = finetune(arm, model_cfg, tokenizer, seed, args, work)
        record["downstream"] = downstream["scores"]
        majority = downstream["majority"]  # a property of the task's data: the same for every arm
        record["finetune_wall_s"] = time.perf_counter() - t0
        if args.progress:
            print(f"  {mode:8s} seed {seed}: {record['downstream']}", flush=True)
        records[mode][str(seed)] = record
    for seed in map(str, args.seeds):
        target = records["none"][seed]["evals"][-1]["eval_loss"]  # this seed's baseline, final
        for mode in MODES:
            r = records[mode][seed]
            r["baseline_final_loss"] = target
            r["time_to_baseline_s"] = first_reach(r["evals"], target)
    return {"data_dir": str(data_dir), "model_config": model_cfg.to_dict(), "pretrain_wall_s": pretrain_wall,
            "wall_s": time.perf_counter() - started, "majority_class_accuracy": majority, "arms": records}


# ----------------------------------------------------------------------------- statistics

def _values(result: dict[str, Any], mode: str, quantity: str) -> list[float | None]:
    out = []
    for r in result["arms"][mode].values():
        if quantity == "final_loss":
            out.append(r["evals"][-1]["eval_loss"])
        elif quantity == "late_loss":
            out.append(late_mean(r["evals"], "eval_loss"))
        elif quantity in ("cls_cosine_centered", "time_to_baseline_s"):
            out.append(r[quantity])
        else:  # "task/metric"
            task, metric = quantity.split("/", 1)
            out.append(r["downstream"][task][metric])
    return out


def quantities(result: dict[str, Any]) -> dict[str, int]:
    """Every reported quantity with its direction (+1: higher is better)."""
    first = next(iter(result["arms"]["none"].values()))
    downstream = {f"{t}/{m}": +1 for t, ms in first["downstream"].items() for m in ms}
    return {**PRETRAIN_QUANTITIES, **downstream}


def summarize(result: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(per arm: {quantity: spread over seeds}, comparisons of arm pairs)."""
    from sctd_dist.finetune.summary import spread

    summary: dict[str, Any] = {}
    for mode in MODES:
        summary[mode] = {}
        for q in quantities(result):
            values = _values(result, mode, q)
            known = [v for v in values if v is not None]
            summary[mode][q] = {**(spread(known) if known else {}), "n": len(known), "of": len(values)}
    comparisons = []
    for a, b in PAIRS:
        for q, direction in quantities(result).items():
            sa, sb = summary[a][q], summary[b][q]
            if not sa.get("values") or not sb.get("values"):
                continue  # drift is undefined for the baseline
            if sa["n"] < sa["of"] or sb["n"] < sb["of"]:  # some seed never reached the target
                comparisons.append({"arms": [a, b], "quantity": q, "mean_difference": None,
                                    "reached": {a: f"{sa['n']}/{sa['of']}", b: f"{sb['n']}/{sb['of']}"},
                                    "better": None, "exceeds_seed_spread": False})
                continue
            diff = sa["mean"] - sb["mean"]
            paired = [x - y for x, y in zip(_values(result, a, q), _values(result, b, q))]
            comparisons.append({
                "arms": [a, b], "quantity": q, "mean_difference": diff, "paired_differences": paired,
                "better": None if diff == 0 else a if diff * direction > 0 else b,
                "exceeds_seed_spread": sa["min"] > sb["max"] or sb["min"] > sa["max"]})
    return summary, comparisons


def _fmt(s: dict[str, Any], digits: int = 4) -> str:
    if not s.get("values"):
        return "n/a"
    text = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return text + (f" ({s['n']}/{s['of']} reached)" if s["n"] < s["of"] else "")


def table(result: dict[str, Any], summary: dict[str, Any]) -> str:
    qs = quantities(result)
    downstream = [q for q in qs if q not in PRETRAIN_QUANTITIES]
    headers = ["arm", "steps", "held-out MLM loss, final", "mean 2nd half", "[CLS] cos centered",
               "s to baseline's final loss", *downstream]
    rows = []
    for mode in MODES:
        s = summary[mode]
        steps = [r["steps"] for r in result["arms"][mode].values()]
        rows.append([LABELS[mode], f"{sum(steps) / len(steps):.0f}", _fmt(s["final_loss"]), _fmt(s["late_loss"]),
                     _fmt(s["cls_cosine_centered"], 3), _fmt(s["time_to_baseline_s"], 0),
                     *(_fmt(s[q], 3) for q in downstream)])
    return markdown_table(headers, rows)


def verdicts(comparisons: list[dict[str, Any]]) -> list[str]:
    """One line per comparison: which arm is ahead and whether that exceeds the seed spread."""
    lines = []
    for c in comparisons:
        a, b = c["arms"]
        if c["mean_difference"] is None:
            lines.append(f"{LABELS[a]} vs {LABELS[b]}, {c['quantity']}: not comparable, reached in "
                         f"{c['reached'][a]} and {c['reached'][b]} seeds")
            continue
        ahead = f"{LABELS[c['better']]} ahead" if c["better"] else "level"
        lines.append(f"{LABELS[a]} vs {LABELS[b]}, {c['quantity']}: {c['mean_difference']:+.4f} ({ahead}), "
                     f"{'exceeds' if c['exceeds_seed_spread'] else 'within'} the seed spread")
    return lines


# ----------------------------------------------------------------------------- plots

def _band(ax, result: dict[str, Any], mode: str, key: str) -> None:
    """Mean over seeds of `key` at each evaluation index, with the min-max band."""
    runs = [r["evals"] for r in result["arms"][mode].values()]
    n = min(len(e) for e in runs)
    if not all(key in e[i] for e in runs for i in range(n)):
        return
    t = [sum(e[i]["train_s"] for e in runs) / len(runs) for i in range(n)]
    ys = [[e[i][key] for e in runs] for i in range(n)]
    ax.plot(t, [sum(y) / len(y) for y in ys], marker="o", ms=3, color=COLORS[mode], label=LABELS[mode])
    ax.fill_between(t, [min(y) for y in ys], [max(y) for y in ys], color=COLORS[mode], alpha=0.2)


def plot(result: dict[str, Any], summary: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, drift_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for mode in MODES:
        _band(loss_ax, result, mode, "eval_loss")
        _band(drift_ax, result, mode, "cls_cosine_centered")
    target = summary["none"]["final_loss"]["mean"]
    loss_ax.axhline(target, color="black", ls="--", lw=0.8, label="baseline's final loss (mean)")
    finals = [v for m in MODES for v in summary[m]["final_loss"]["values"]]
    loss_ax.set_ylim(min(finals) - 0.1, max(finals) + 0.6)  # the untrained start would flatten the rest
    loss_ax.set(xlabel="training wall-clock (s)", ylabel="held-out MLM loss (all tokens)",
                title="Held-out loss, mean and min-max over seeds")
    drift_ax.set(xlabel="training wall-clock (s)", ylabel="cos([CLS] dropping, [CLS] full), centered",
                 title="[CLS] agreement (higher = less drift)")
    for ax in (loss_ax, drift_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    downstream = [q for q in quantities(result) if q not in PRETRAIN_QUANTITIES]
    fig2, axes = plt.subplots(1, max(1, len(downstream)), figsize=(max(6.0, 3.4 * len(downstream)), 3.8),
                              squeeze=False)
    for ax, q in zip(axes[0], downstream):
        for i, mode in enumerate(MODES):
            s = summary[mode][q]
            ax.bar(i, s["mean"], color=COLORS[mode], alpha=0.5)
            ax.scatter([i] * len(s["values"]), s["values"], color=COLORS[mode], zorder=3, s=14)
        task, metric = q.split("/", 1)
        if metric == "accuracy" and task in result.get("majority_class_accuracy", {}):
            ax.axhline(result["majority_class_accuracy"][task], color="black", ls="--", lw=0.8,
                       label="majority class")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(MODES)), ["baseline", "vanilla", "ScTD"])
        ax.set_title(q, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig2.suptitle("Fine-tuned on the offline suite: mean (bar) and each seed (dots)", fontsize=10)
    return save_figures([fig, fig2], [out_dir / f"{stem}_pretraining.png", out_dir / f"{stem}_downstream.png"])


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="pretraining (and fine-tuning) seeds")
    p.add_argument("--budget-s", type=float, default=180.0, help="training seconds per arm and seed")
    p.add_argument("--evals", type=int, default=9, help="evaluations per arm after the initial one")
    add_study_args(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--tasks", nargs="+", default=["stdlib-topic", "stdlib-samedoc"],
                   help="sctd_dist.finetune task names (GLUE/SQuAD names need the hub)")
    g.add_argument("--ft-lr", type=float, default=1e-3)
    g.add_argument("--ft-epochs", type=float, default=3.0)
    g.add_argument("--ft-batch", type=int, default=32)
    g.add_argument("--ft-max-seq-length", type=int, default=64)
    g.add_argument("--ft-max-train-samples", type=int, default=1000)
    g.add_argument("--ft-max-eval-samples", type=int, default=None)
    g.add_argument("--ft-bf16", action="store_true", help="bf16 autocast for fine-tuning (GPUs)")
    g.add_argument("--ft-cache-dir", type=Path, default=None, help="datasets cache for hub tasks")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / "runs" / "quality",
                   help="the arms' Hugging Face folders and fine-tuning results")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_s, args.evals, args.layers = min(args.budget_s, 10.0), 3, 4
        args.ft_epochs, args.ft_max_train_samples, args.ft_max_eval_samples = 1.0, 200, 200
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds needs at least two distinct seeds (a spread needs several)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    summary, comparisons = summarize(result)
    tbl = table(result, summary)
    lines = verdicts(comparisons)
    print(tbl)
    print("\n".join(lines))
    payload = {"benchmark": "quality", "environment": environment(args, torch.device(args.device)),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               **result, "summary": summary, "comparisons": comparisons, "table": tbl, "verdicts": lines}
    if not args.no_write:
        args.plots.mkdir(parents=True, exist_ok=True)
        payload["plots"] = [str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p)
                            for p in plot(result, summary, args.plots, study_name(args, "quality"))]
        write_json(args, study_name(args, "quality"), payload)
        print("wrote", *payload["plots"])
    return payload


if __name__ == "__main__":
    main()
