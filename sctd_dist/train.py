"""Training entry point: `deepspeed sctd_dist/train.py ...`, `torchrun ...`, `mpirun ...`,
`srun ...` or `python -m sctd_dist.train ...`.

Parse the flags, build the run (`sctd_dist.run`), train it: `train()` loops over `train_step()`,
evaluates now and then, and hands every step to the checkpointer. A restart is the same command:
with --save (or --load) pointing at a folder that holds a checkpoint, training resumes from its
newest complete checkpoint at exactly the next sample.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file by a launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from sctd_dist import preemption
from sctd_dist.arguments import parse_args
from sctd_dist.coordination import is_rank0
from sctd_dist.metrics import StepTimer, engine_stats, step_means
from sctd_dist.model.pretraining import PretrainingModel
from sctd_dist.run import Run, build_run


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(run: Run, step: int) -> dict[str, Any]:
    """Optimizer step `step` (0-based) on this rank's micro-batches of the next global batch;
    returns the step's numbers (metrics averaged over micro-batches and data-parallel ranks)."""
    sums: dict[str, torch.Tensor] = {}
    batches = next(run.loader)
    for batch in batches:
        out = run.engine(_to_device(batch, run.ctx.device), step=step)
        run.engine.backward(out.loss)
        run.engine.step()  # DeepSpeed updates the weights at the last micro-batch only
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
    return {**step_means(sums, len(batches), run.ctx),
            **engine_stats(run.engine, with_model_state=step == run.start_step)}


def evaluate(engine, model: PretrainingModel, valid_loader, iters: int, device) -> dict[str, float]:
    """Held-out MLM loss and accuracy with all tokens, token-weighted over DP ranks; with token
    dropping on, also the [CLS] cosine between the dropping and the full path, per sequence."""
    import torch.distributed as dist

    engine.eval()
    # loss*n, correct, n (masked tokens); each cosine*rows, rows (sequences)
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for i in range(min(iters, len(valid_loader))):
        out = model.evaluate(_to_device(valid_loader.batch(i), device))
        n, rows = out["eval_tokens"], out["eval_sequences"]
        totals += torch.tensor([out["eval_loss"] * n, out["eval_acc"] * n, n,
                                out.get("eval_cls_cosine", 0.0) * rows,
                                out.get("eval_cls_cosine_centered", 0.0) * rows, rows],
                               dtype=torch.float64, device=device)
    engine.train()
    if model.ctx.dp_size > 1:
        dist.all_reduce(totals, group=model.ctx.dp_group)
    n, rows = max(totals[2].item(), 1.0), max(totals[5].item(), 1.0)
    result = {"eval_loss": totals[0].item() / n, "eval_acc": totals[1].item() / n}
    if model.drop.enabled:
        result["eval_cls_cosine"] = totals[3].item() / rows
        result["eval_cls_cosine_centered"] = totals[4].item() / rows
    return result


def train(run: Run) -> dict[str, Any]:
    """Train from `run.start_step` to --train-iters, or until a stop signal; returns the summary.

    `step` counts the optimizer steps done; see `MetricsLogger` for how records number them."""
    cfg, logger, timer = run.cfg, run.logger, StepTimer(run.ctx.device)
    step, stopped = run.start_step, False
    while step < cfg.train_iters and not stopped:
        timer.start()
        numbers = train_step(run, step)
        logger.step(step, run.loader.consumed_samples, numbers, timer.stop(), run.step_flops(step))
        step += 1
        if cfg.eval_iters and (step % cfg.eval_interval == 0 or step == cfg.train_iters):
            logger.eval(step, evaluate(run.engine, run.model, run.valid_loader, cfg.eval_iters,
                                       run.ctx.device))
        stopped = preemption.stop_requested(run.ctx.device)
        saved = run.checkpointer.after_step(step, stopped)
        if saved is not None:
            logger.event("checkpoint", step=step, path=str(saved))
        if stopped:
            logger.event("preempted", step=step, saved=saved is not None)
    return logger.finish(step, run.loader.consumed_samples, stopped)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = train(build_run(cfg))
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_rank0():
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
