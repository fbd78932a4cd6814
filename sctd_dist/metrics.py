"""What a run shows and records: a rank-0 progress bar, `metrics.jsonl`, TensorBoard events and
a final summary. One JSON object per optimizer step, eval records and lifecycle events.

The logger is given numbers (the step's metrics, its time and model FLOPs); `step_means` and
`engine_stats` make the numbers of a step from the model's outputs and the DeepSpeed engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sctd_dist.coordination import is_rank0
from sctd_dist.flops import peak_tflops
from sctd_dist.parallel.state import ParallelContext


class StepTimer:
    """Wall time of one optimizer step (synchronising the GPU so the number is real)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self._t0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: GPU allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def model_state_bytes(engine) -> int:
    """Bytes this rank holds for model states: its copy or ZeRO partition of the parameters, plus
    the optimizer's own parameters (ZeRO's fp32 partitions) and their state (Adam moments)."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = sum(nbytes(p.ds_tensor if hasattr(p, "ds_tensor") else p) for p in engine.module.parameters())
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    model_params = {id(p) for p in engine.module.parameters()}
    master = sum(nbytes(getattr(p, "ds_tensor", p)) for g in base.param_groups for p in g["params"]
                 if id(p) not in model_params)
    states = sum(nbytes(t) for st in base.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0)
    return int(params + master + states)


def step_means(sums: dict[str, torch.Tensor], micro_batches: int, ctx: ParallelContext) -> dict[str, float]:
    """The step's metrics from per-micro-batch sums: averaged over the micro-batches, then over
    the data-parallel ranks (every rank gets the same numbers; one host sync per step)."""
    if not sums:
        return {}
    keys = sorted(sums)
    t = torch.stack([sums[k] / micro_batches for k in keys]).to(torch.float64)
    if ctx.dp_size > 1:
        dist.all_reduce(t, group=ctx.dp_group)
        t /= ctx.dp_size
    return dict(zip(keys, t.tolist()))


def engine_stats(engine, with_model_state: bool = False) -> dict[str, Any]:
    """The optimizer's numbers after a step: learning rate, gradient norm, fp16 loss scale,
    skipped steps; with `with_model_state` also this rank's model-state bytes (the optimizer
    state exists after the first step)."""
    stats: dict[str, Any] = {
        "lr": float(engine.get_lr()[0]) if engine.get_lr() else None,
        "grad_norm": _float(engine.get_global_grad_norm()),
        "loss_scale": _float(getattr(engine.optimizer, "cur_scale", None)
                             or getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)),
        "skipped": int(getattr(engine, "skipped_steps", 0)),
    }
    if with_model_state:
        stats["model_state_bytes"] = model_state_bytes(engine)
    return stats


class MetricsLogger:
    """Rank 0 writes `metrics.jsonl`, TensorBoard events and the progress bar; it is given numbers.

    Step numbering, the same in every record: `step` is the number of optimizer updates the
    weights had when the record's numbers were taken. A training record's `step` is the step's
    0-based index (its loss is computed on the weights after `step` updates); an evaluation, a
    checkpoint (`global_step{step}`), `preempted`, `resume` and `start` carry the number of
    updates done so far, so an evaluation at step 50 follows the training record of step 49.
    """

    def __init__(self, log_dir: Path | None, device: torch.device, *, world_size: int,
                 tokens_per_step: int, micro_batches: int, total_steps: int, start_step: int,
                 progress: bool = True) -> None:
        self.rank0 = is_rank0()
        self.device = device
        self.world_size = world_size
        self.tokens_per_step = tokens_per_step
        self.micro_batches = micro_batches
        self.peak = peak_tflops(device_name(device))
        self.started = time.time()
        self.tokens = 0
        self.train_time = 0.0
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, float] = {}
        self._jsonl = self._tb = self._bar = None
        if not self.rank0:
            return
        if log_dir is not None:
            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(log_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency; stay usable without it
                self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        """A lifecycle record (start, resume, checkpoint, preempted)."""
        if self.rank0:
            self._write({"event": kind, "time": time.time(), **fields})

    def step(self, step: int, consumed: int, values: dict[str, Any], seconds: float, flops: float) -> None:
        """Record optimizer step `step` (0-based) that took `seconds` and `flops` model FLOPs (all
        ranks together); `consumed`: samples consumed after it; `values`: the step's numbers."""
        self.tokens += self.tokens_per_step
        self.train_time += seconds
        tflops = flops / seconds / self.world_size / 1e12
        record: dict[str, Any] = {
            "step": step, "consumed_samples": consumed, **values,
            "step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds,
            "tflops_per_device": tflops, "micro_batches": self.micro_batches,
            "memory_peak_bytes": peak_memory_bytes(self.device),
        }
        if self.peak:
            record["mfu"] = tflops / self.peak
        self.last = record
        if not self.rank0:
            return
        self._write(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}",
                                  tok_s=f"{self.tokens_per_step / seconds:,.0f}", refresh=False)
            self._bar.update(1)

    def eval(self, step: int, values: dict[str, float]) -> None:
        """Record an evaluation of the weights after `step` updates."""
        self.last_eval = values
        if not self.rank0:
            return
        self._write({"step": step, **values})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"eval/{k}", v, step)
        if self._bar is not None:
            self._bar.write(f"step {step}: eval_loss {values['eval_loss']:.4f} "
                            f"eval_acc {values['eval_acc']:.4f}")

    def finish(self, step: int, consumed: int, preempted: bool) -> dict[str, Any]:
        """Close the outputs; return (and record) the run summary."""
        summary = {
            "steps": step, "consumed_samples": consumed, "preempted": preempted,
            "final_loss": self.last.get("loss"), **self.last_eval,
            "mean_tokens_per_s": self.tokens / self.train_time if self.train_time else None,
            "wall_time_s": time.time() - self.started,
        }
        if self.rank0:
            self._write({"event": "summary", **summary})
            if self._bar is not None:
                self._bar.close()
            if self._tb is not None:
                self._tb.close()
            if self._jsonl is not None:
                self._jsonl.close()
        return summary


def _float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return float(x.item())
    return float(x)
