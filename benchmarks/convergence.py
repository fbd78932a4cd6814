"""Small-scale quality at equal wall-clock: all tokens vs vanilla token dropping vs ScTD.

Three copies of the same initial weights (BERT's block, or ModernBERT's with `--arch modernbert`:
sliding-window layers, rotary positions, attention within documents, as train.py runs it) train
on the embedded sample corpus with the project's own data pipeline (packed shards, dynamic
masking, the resumable sampler) and model; each arm gets the same wall-clock budget of training
time. The arms run interleaved in one process (the arm that has used the least time takes the
next step), so background load on a shared machine slows them alike. At regular marks of each arm's own training time it is evaluated on the whole
held-out split (evaluation time is not charged to the budget):

  * held-out MLM loss and accuracy with all tokens (what a downstream user of the encoder gets);
  * semantic drift: the mean cosine between the final [CLS] vector of the token-dropping path and
    of the full path of the same model on the same held-out batch (`eval_cls_cosine`, the metric
    train.py logs too). ScTD's consistency term is meant to keep it near 1.

Optimizer: torch AdamW (the ds_configs' betas, eps and weight decay) with a linear warmup and
then a constant learning rate: a decaying schedule would need a step count, and the arms reach
different step counts in the same time.

    python benchmarks/convergence.py                      # ~7 min on 2 CPU cores (make bench)
    python benchmarks/convergence.py --budget-s 600 --evals 15  # the committed study, ~32 min

Writes benchmarks/results/convergence.json and convergence_loss.png / convergence_drift.png
(with `--arch modernbert`: convergence_modernbert.json, convergence_modernbert_loss.png, ...).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from common import (REPO_ROOT, RESULTS_DIR, add_common_args, environment, markdown_table, save_figures,
                    setup_torch, write_json)

MODES = ("none", "vanilla", "sctd")
LABELS = {"none": "baseline (all tokens)", "vanilla": "vanilla token dropping", "sctd": "ScTD"}
COLORS = {"none": "tab:gray", "vanilla": "tab:blue", "sctd": "tab:orange"}  # the same in every plot


class Arm:
    """One model + optimizer + data position, advanced one optimizer step at a time."""

    def __init__(self, mode: str, args, model_cfg, special, ctx, state: dict[str, torch.Tensor],
                 loader, device: torch.device) -> None:
        from sctd_dist.model.arch import attends_within_documents
        from sctd_dist.model.config import TokenDropConfig
        from sctd_dist.model.pretraining import PretrainingModel

        self.mode = mode
        drop = TokenDropConfig(mode=mode, keep_ratio=args.keep_ratio, sctd_interval=args.sctd_interval,
                               sctd_weight=args.sctd_weight, mlm_mix=args.sctd_mlm_mix)
        # Attention within documents as train.py defaults it for the architecture.
        self.model = PretrainingModel(model_cfg, drop, special, ctx,
                                      within_documents=attends_within_documents(args.arch)).to(device)
        self.model.mlm.load_state_dict(state)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                                     weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: min(1.0, (step + 1) / args.warmup_steps))
        self.loader = loader
        self.device = device
        self.step = 0
        self.train_s = 0.0
        self.train_loss: list[tuple[float, float]] = []  # (train seconds, loss)
        self.evals: list[dict[str, float]] = []

    def train_step(self) -> None:
        t0 = time.perf_counter()
        batches = self.loader.batches_for_step(self.step * self.loader.global_batch_size)
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for batch in batches:
            out = self.model({k: v.to(self.device) for k, v in batch.items()}, step=self.step)
            (out.loss / len(batches)).backward()
            losses.append(out.metrics["mlm_loss"])
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        loss = float(torch.stack(losses).mean())
        self.step += 1
        self.train_s += time.perf_counter() - t0
        self.train_loss.append((self.train_s, loss))

    def evaluate(self, valid_loader) -> dict[str, float]:
        """The training entry point's evaluation (the module stands in for its engine), over
        the whole held-out loader."""
        from sctd_dist.train import evaluate

        r = evaluate(self.model, self.model, valid_loader, len(valid_loader), self.device)
        record = {"train_s": self.train_s, "step": self.step, "eval_loss": r["eval_loss"],
                  "eval_acc": r["eval_acc"]}
        if "eval_cls_cosine" in r:
            record.update(cls_cosine=r["eval_cls_cosine"], cls_cosine_centered=r["eval_cls_cosine_centered"])
        self.evals.append(record)
        return record


def build(args, device: torch.device):
    """The model config, special ids, train loader and held-out loader of --data-path (default:
    the sample corpus)."""
    from sctd_dist.data.dataset import PackedDataset
    from sctd_dist.data.loader import PretrainingDataLoader, ValidationDataLoader
    from sctd_dist.data.sample_cache import ensure_sample_dataset
    from sctd_dist.model.arch import config_from_preset

    data_dir = args.data_path or ensure_sample_dataset(args.data_cache, seq_length=args.seq_length,
                                                       validation_fraction=args.validation_fraction)
    train, valid = PackedDataset(data_dir, split="train"), PackedDataset(data_dir, split="validation")
    shape = dict(vocab_size=train.vocab_size, num_hidden_layers=args.layers, hidden_size=args.hidden,
                 num_attention_heads=args.heads)
    if args.arch == "modernbert":  # the tiny preset's GLU width and 32-token window
        special = train.special_ids
        shape.update(pad_token_id=special.pad, cls_token_id=special.cls, sep_token_id=special.sep)
    else:
        shape.update(intermediate_size=4 * args.hidden, max_position_embeddings=max(512, args.seq_length))
    model_cfg = config_from_preset(args.arch, "tiny", **shape)
    loader = PretrainingDataLoader(train, global_batch_size=args.batch, micro_batch_size=args.batch,
                                   dp_rank=0, dp_size=1, seed=args.seed)
    valid_loader = ValidationDataLoader(valid, micro_batch_size=args.batch, dp_rank=0, dp_size=1,
                                        seed=args.seed, max_samples=args.eval_samples)
    return data_dir, train, model_cfg, loader, valid_loader


def train_interleaved(arms: dict[str, Arm], valid, budget_s: float, evals: int, progress: bool) -> float:
    """Train every arm for `budget_s` seconds of its own clock, one optimizer step at a time, always
    the arm that has trained least so far, so background load slows all arms alike. Each arm is
    evaluated at `evals` evenly spaced marks of its clock (its first evaluation, at 0 s, is the
    caller's). Returns the wall time of the loop."""
    marks = [budget_s * (i + 1) / evals for i in range(evals)]
    started = time.perf_counter()
    while True:
        pending = [(name, a) for name, a in arms.items() if a.train_s < budget_s]
        if not pending:
            break
        name, arm = min(pending, key=lambda item: item[1].train_s)
        arm.train_step()
        # Evaluate at each budget mark this step crossed (loss curves on a common time axis).
        done = len(arm.evals) - 1
        if done < len(marks) and arm.train_s >= marks[done]:
            arm.evaluate(valid)
        if progress:
            print(f"\r{name:10s} step {arm.step:5d} {arm.train_s:6.0f}/{budget_s:.0f}s "
                  f"loss {arm.train_loss[-1][1]:.3f}", end="", flush=True)
    if progress:
        print()
    return time.perf_counter() - started


def study_name(args, name: str) -> str:
    """A study's file stem: `name` for BERT, `name`_modernbert for the modern block."""
    return name if args.arch == "bert" else f"{name}_{args.arch}"


def run(args) -> dict[str, Any]:
    from sctd_dist.model.arch import build_mlm
    from sctd_dist.parallel import initialize

    device = setup_torch(args)
    ctx = initialize(1)
    data_dir, train, model_cfg, loader, valid = build(args, device)
    torch.manual_seed(args.seed)
    state = build_mlm(model_cfg, ctx).state_dict()  # one initialisation for every arm
    arms = {m: Arm(m, args, model_cfg, train.special_ids, ctx, state, loader, device)
            for m in args.modes.split(",")}
    for arm in arms.values():
        torch.manual_seed(args.seed)  # same dropout stream at the start of every arm
        arm.evaluate(valid)
    wall_s = train_interleaved(arms, valid, args.budget_s, args.evals, args.progress)
    return {"data_dir": str(data_dir), "model_config": model_cfg.to_dict(), "ctx_device": str(device),
            "wall_s": wall_s, "arms": {
                m: {"steps": a.step, "train_s": a.train_s,
                    "samples": a.step * args.batch,
                    "evals": a.evals,
                    "train_loss": [[round(t, 3), round(l, 5)] for t, l in a.train_loss]}
                for m, a in arms.items()}}


def late_mean(evals: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the second half of the evaluations: the trend, not one noisy point."""
    values = [e[key] for e in evals[len(evals) // 2:] if key in e]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


HEADERS = ["arm", "steps", "train s", "held-out MLM loss", "loss, mean 2nd half", "held-out acc",
           "[CLS] cos", "[CLS] cos centered", "centered, mean 2nd half"]


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for mode, arm in result["arms"].items():
        last = arm["evals"][-1]
        rows.append([LABELS[mode], arm["steps"], f"{arm['train_s']:.0f}", f"{last['eval_loss']:.4f}",
                     _fmt(late_mean(arm["evals"], "eval_loss")), f"{last['eval_acc']:.4f}",
                     _fmt(last.get("cls_cosine")), _fmt(last.get("cls_cosine_centered")),
                     _fmt(late_mean(arm["evals"], "cls_cosine_centered"))])
    return rows


def _curves(ax, arms: dict[str, Any], key: str, ylabel: str, title: str, skip_first: bool = False) -> None:
    """One line per arm that has `key` in its evaluations, against training time."""
    for mode, arm in arms.items():
        points = [(e["train_s"], e[key]) for e in arm["evals"][int(skip_first):] if key in e]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=LABELS[mode], color=COLORS[mode])
    ax.set(xlabel="training wall-clock (s)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Held-out loss vs training time, and drift (raw and centered [CLS] cosine) vs time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    arms = result["arms"]
    loss_fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # The evaluation at 0 s (untrained, the same for every arm) is left out: it would flatten the rest.
    _curves(ax, arms, "eval_loss", "held-out MLM loss (all tokens)", "Equal wall-clock budget per arm",
            skip_first=True)
    drift_fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, kind in ((axes[0], "cls_cosine", "raw"), (axes[1], "cls_cosine_centered", "centered")):
        _curves(ax, arms, key, f"cos([CLS] dropping, [CLS] full), {kind}",
                f"[CLS] agreement, {kind} (higher = less drift)")
    return save_figures([loss_fig, drift_fig], [out_dir / f"{stem}_loss.png", out_dir / f"{stem}_drift.png"])


def add_study_args(p: argparse.ArgumentParser) -> None:
    """Flags of the model, the pretraining objective, the data and the outputs, shared with
    quality.py."""
    from sctd_dist.model.arch import ARCHS

    p.add_argument("--arch", choices=ARCHS, default="bert",
                   help="the encoder block (train.py's flag); modernbert attends within documents")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--sctd-interval", type=int, default=10)
    p.add_argument("--sctd-weight", type=float, default=0.05)
    p.add_argument("--sctd-mlm-mix", type=float, default=0.0,
                   help="share of the full pass's MLM loss on consistency steps (train.py's flag)")
    p.add_argument("--eval-samples", type=int, default=256, help="held-out sequences per evaluation")
    p.add_argument("--validation-fraction", type=float, default=0.05,
                   help="share of the sample corpus held out (train.py's default is 0.01: too few "
                        "sequences for a steady held-out curve)")
    p.add_argument("--data-cache", type=Path, default=REPO_ROOT / "data_cache",
                   help="prepared sample corpus cache (train.py's default folder)")
    p.add_argument("--data-path", type=Path, help="a prepared corpus (sctd_dist.data.prepare) instead of the sample")
    p.add_argument("--plots", type=Path, default=RESULTS_DIR, help="folder for the PNGs")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--modes", default=",".join(MODES), help="arms to run (default: all three)")
    p.add_argument("--budget-s", type=float, default=120.0, help="training seconds per arm")
    p.add_argument("--evals", type=int, default=10, help="evaluations per arm after the initial one")
    add_study_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.budget_s, args.evals, args.layers = min(args.budget_s, 15.0), 3, 4
    result = run(args)
    table = markdown_table(HEADERS, summary_rows(result))
    print(table)
    payload = {"benchmark": "convergence", "environment": environment(args, torch.device(args.device)),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               **result, "table": table}
    if not args.no_write:
        args.plots.mkdir(parents=True, exist_ok=True)
        payload["plots"] = [str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p)
                            for p in plot(result, args.plots, study_name(args, "convergence"))]
        write_json(args, study_name(args, "convergence"), payload)
        print("wrote", *payload["plots"])
    return payload


if __name__ == "__main__":
    main()
