"""What a run shows and records: a rank-0 progress bar, `metrics.jsonl`, TensorBoard events and
a final summary. One JSON object per optimizer step, eval records and lifecycle events."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sctd_dist.flops import peak_tflops, step_flops_per_sequence
from sctd_dist.model.config import BertModelConfig
from sctd_dist.model.router import num_kept
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


def runtime_info(model_cfg: BertModelConfig, ctx: ParallelContext, seq_length: int,
                 dtype: torch.dtype, compiled: bool) -> dict[str, Any]:
    """How this run executes: the memory allocator, the attention kernel that
    scaled_dot_product_attention picks for the layers' shapes (flash / efficient / math), and
    whether the encoder layers are compiled."""
    from sctd_dist.allocator import in_use
    from sctd_dist.parallel.kernels import sdpa_backend

    heads = model_cfg.num_attention_heads // ctx.tp_size
    dropout = model_cfg.attention_probs_dropout_prob
    if compiled and ctx.tp_size > 1 and dropout > 0:
        backend = "math (compiled, TP-sharded attention dropout)"  # see parallel.layers.attention
    else:
        backend = sdpa_backend(1, heads, seq_length, model_cfg.head_dim, dtype, ctx.device, dropout)
    return {"allocator": in_use(), "sdpa_backend": backend, "compile": compiled}


class MetricsLogger:
    """Rank 0 writes; every rank takes part in the DP average of the step's numbers."""

    def __init__(self, log_dir: Path | None, ctx: ParallelContext, model_cfg: BertModelConfig,
                 cfg: Any, ds: dict[str, Any], total_steps: int, start_step: int,
                 progress: bool = True) -> None:
        self.ctx = ctx
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.model_cfg = model_cfg
        self.drop = cfg.token_drop
        self.seq = cfg.seq_length
        self.global_batch = ds["train_batch_size"]
        self.keep_ratio = cfg.token_drop.keep_ratio
        self.peak = peak_tflops(device_name(ctx.device))
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

    def announce(self, runtime: dict[str, Any]) -> None:
        """One start-up line on rank 0 (stderr) saying how the run executes."""
        if self.rank0:
            words = {True: "on", False: "off"}
            text = ", ".join(f"{k.replace('_', ' ')} {words.get(v, v)}" for k, v in runtime.items())
            print(f"runtime: {text}", file=sys.stderr, flush=True)

    def event(self, kind: str, **fields: Any) -> None:
        """A lifecycle record (start, resume, checkpoint, preempted)."""
        if self.rank0:
            self._write({"event": kind, "time": time.time(), **fields})

    def _dp_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.ctx.dp_size == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t, group=self.ctx.dp_group)
        return dict(zip(keys, (t / self.ctx.dp_size).tolist()))

    def step(self, step: int, consumed: int, values: dict[str, float], engine, seconds: float,
             micro_batches: int) -> None:
        """Record optimizer step `step` (0-based) that took `seconds`."""
        values = self._dp_mean(values)
        tokens = self.global_batch * self.seq
        self.tokens += tokens
        self.train_time += seconds
        kept = num_kept(self.seq, self.keep_ratio) if self.drop.enabled else None
        masked = 0.15 * self.seq
        flops = step_flops_per_sequence(self.model_cfg, self.drop, self.seq, masked, step, kept)
        tflops = flops * self.global_batch / seconds / self.ctx.world_size / 1e12
        record: dict[str, Any] = {
            "step": step, "consumed_samples": consumed, **values,
            "lr": float(engine.get_lr()[0]) if engine.get_lr() else None,
            "grad_norm": _float(engine.get_global_grad_norm()),
            "loss_scale": _float(getattr(engine.optimizer, "cur_scale", None)
                                 or getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)),
            "skipped": int(getattr(engine, "skipped_steps", 0)),
            "step_time_s": seconds, "tokens_per_s": tokens / seconds,
            "tflops_per_device": tflops, "micro_batches": micro_batches,
            "memory_peak_bytes": peak_memory_bytes(self.ctx.device),
        }
        if self.peak:
            record["mfu"] = tflops / self.peak
        if not self.last:  # once the optimizer state exists (after this process's first step)
            record["model_state_bytes"] = model_state_bytes(engine)
        self.last = record
        if not self.rank0:
            return
        self._write(record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.3f}",
                                  tok_s=f"{tokens / seconds:,.0f}", refresh=False)
            self._bar.update(1)

    def eval(self, step: int, values: dict[str, float]) -> None:
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
            "rank0": self.rank0, "steps": step, "consumed_samples": consumed, "preempted": preempted,
            "final_loss": self.last.get("loss"), **self.last_eval,
            "mean_tokens_per_s": self.tokens / self.train_time if self.train_time else None,
            "wall_time_s": time.time() - self.started,
        }
        if self.rank0:
            self._write({"event": "summary", **{k: v for k, v in summary.items() if k != "rank0"}})
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
