"""Training entry point: `deepspeed sctd_dist/train.py ...`, `torchrun ...`, `mpirun ...`,
`srun ...` or `python -m sctd_dist.train ...`.

A restart is the same command: with --save (or --load) pointing at a folder that holds a
checkpoint, training resumes from its newest complete checkpoint at exactly the next sample.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a file by a launcher: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from sctd_dist import checkpoint, preemption
from sctd_dist.arguments import TrainConfig, parse_args
from sctd_dist.ds_config import (apply_schedule, check_device_support, load_ds_config, precision,
                                 resolve_batch_sizes, validate_with_deepspeed, zero_stage)
from sctd_dist.metrics import MetricsLogger, StepTimer, runtime_info
from sctd_dist.model.config import BertModelConfig
from sctd_dist.model.pretraining import PretrainingModel
from sctd_dist.parallel import MegatronMPU, ParallelContext, check_tp_size, initialize
from sctd_dist.parallel.launch_env import discover


def prepare_ds_config(cfg: TrainConfig, ds: dict[str, Any], dp_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON, with CLI overrides and the run length applied, checked by DeepSpeed."""
    check_device_support(ds, device_type)
    ds = resolve_batch_sizes(ds, dp_size, micro_batch=cfg.micro_batch_size,
                             global_batch=cfg.global_batch_size)
    ds = apply_schedule(ds, cfg.lr_decay_iters or cfg.train_iters)
    if cfg.lr is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg.lr
    validate_with_deepspeed(ds, dp_size)
    return ds


def build_data(cfg: TrainConfig, model_cfg: BertModelConfig, ctx: ParallelContext, ds: dict[str, Any]):
    """Datasets and loaders for this DP rank; the sample corpus when there is no --data-path."""
    from sctd_dist.data.dataset import PackedDataset, check_compatible
    from sctd_dist.data.loader import PretrainingDataLoader, ValidationDataLoader
    from sctd_dist.data.masking import MaskingConfig
    from sctd_dist.data.prepare import ensure_sample_dataset

    data_dir = cfg.data_path
    if data_dir is None:
        # One process: a worker pool forked from a rank that already runs torch.distributed
        # threads can deadlock (seen on a 2-core machine); the sample corpus takes ~15 s alone.
        data_dir = _rank0_first(lambda: ensure_sample_dataset(cfg.data_cache, seq_length=cfg.seq_length,
                                                              num_proc=1))
    check_compatible(data_dir, max_position_embeddings=model_cfg.max_position_embeddings)
    train = PackedDataset(data_dir, split="train")
    valid = PackedDataset(data_dir, split="validation")
    if train.seq_length != cfg.seq_length:
        raise ValueError(f"--data-path {data_dir} holds sequences of {train.seq_length} tokens but "
                         f"--seq-length is {cfg.seq_length}; prepare the data at that length or "
                         f"pass --seq-length {train.seq_length}")
    masking = MaskingConfig(whole_word_masking=cfg.whole_word_masking)
    micro = ds["train_micro_batch_size_per_gpu"]
    loader = PretrainingDataLoader(train, global_batch_size=ds["train_batch_size"],
                                   micro_batch_size=micro, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                                   seed=cfg.seed, masking=masking)
    valid_loader = ValidationDataLoader(valid, micro_batch_size=micro, dp_rank=ctx.dp_rank,
                                        dp_size=ctx.dp_size, seed=cfg.seed, masking=masking)
    return Path(data_dir), train, loader, valid_loader


def _rank0_first(fn):
    """Run `fn` on global rank 0 first (it builds a cache), then on the others (they read it)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    result = fn() if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return result if rank == 0 else fn()


def run_record(cfg: TrainConfig, model_cfg: BertModelConfig, ctx: ParallelContext,
               ds: dict[str, Any], step: int, consumed: int, data_dir: Path) -> dict[str, Any]:
    """What a checkpoint records about the run (compared on resume)."""
    return {
        "step": step, "consumed_samples": consumed, "model": model_cfg.to_dict(),
        "tensor_model_parallel_size": ctx.tp_size, "sequence_parallel": ctx.sequence_parallel,
        "world_size": ctx.world_size, "dp_size": ctx.dp_size, "zero_stage": zero_stage(ds),
        "global_batch_size": ds["train_batch_size"], "seq_length": cfg.seq_length,
        "token_drop": vars(cfg.token_drop).copy(), "data_path": str(data_dir),
        "train_config": cfg.to_dict(),
    }


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns the final summary."""
    import deepspeed

    preemption.install()  # first: a signal during start-up must not kill the job unsaved
    model_cfg = BertModelConfig.from_preset(cfg.model, cfg.model_config,
                                            activation_checkpointing=cfg.activation_checkpointing)
    model_cfg.check_tensor_parallel(cfg.tensor_model_parallel_size)
    model_cfg.check_seq_length(cfg.seq_length)
    check_tp_size(cfg.tensor_model_parallel_size, discover().world_size)
    ds_file = load_ds_config(cfg.deepspeed_config)  # removed keys fail here, before any group
    ctx = initialize(cfg.tensor_model_parallel_size, sequence_parallel=cfg.sequence_parallel,
                     seed=cfg.seed)
    ds = prepare_ds_config(cfg, ds_file, ctx.dp_size, ctx.device.type)
    data_dir, train_set, loader, valid_loader = build_data(cfg, model_cfg, ctx, ds)
    if model_cfg.vocab_size != train_set.vocab_size and cfg.model_config is None and cfg.init_hf is None:
        # The presets take their vocabulary from the data's tokenizer.
        model_cfg = BertModelConfig.from_preset(
            cfg.model, activation_checkpointing=cfg.activation_checkpointing,
            vocab_size=train_set.vocab_size)
    elif model_cfg.vocab_size < train_set.vocab_size:
        raise ValueError(f"vocab_size {model_cfg.vocab_size} of the model is smaller than the "
                         f"tokenizer's {train_set.vocab_size} in {data_dir}; fix --model-config")
    model = PretrainingModel(model_cfg, cfg.token_drop, train_set.special_ids, ctx)
    model.check_seq_length(cfg.seq_length)
    if cfg.init_hf is not None:
        _load_hf_weights(model, cfg.init_hf)
    model.to(ctx.device)
    if cfg.compile:
        model.compile_layers()
    plan = checkpoint.plan_resume(cfg.load_dir, run_record(cfg, model_cfg, ctx, ds, 0, 0, data_dir))
    if plan is not None and plan.universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds, mpu=MegatronMPU(), dist_init_required=False)

    step, consumed = 0, 0
    if plan is not None:
        saved, state = checkpoint.load(engine, cfg.load_dir, plan)
        model.importance.load_state_dict(state["importance"])
        step, consumed = saved["step"], saved["consumed_samples"]
    tag = None if plan is None else plan.tag

    logger = MetricsLogger(cfg.log_dir, ctx, model_cfg, cfg, ds, total_steps=cfg.train_iters,
                           start_step=step, progress=cfg.progress)
    runtime = runtime_info(model_cfg, ctx, cfg.seq_length, precision(ds), cfg.compile)
    logger.announce(runtime)
    logger.event("start" if tag is None else "resume", step=step, consumed_samples=consumed,
                 checkpoint=tag, world_size=ctx.world_size, dp_size=ctx.dp_size,
                 tp_size=ctx.tp_size, precision=str(precision(ds)), zero_stage=zero_stage(ds), **runtime)
    timer = StepTimer(ctx.device)
    stopped_by_signal = False
    save_every = cfg.save_interval
    while step < cfg.train_iters:
        timer.start()
        sums: dict[str, torch.Tensor] = {}
        micro_batches = loader.batches_for_step(consumed)
        for batch in micro_batches:
            out = engine(_to_device(batch, ctx.device), step=step)
            engine.backward(out.loss)
            engine.step()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        model.update_importance()
        consumed += ds["train_batch_size"]
        step += 1
        elapsed = timer.stop()
        record = {k: (v / len(micro_batches)).item() for k, v in sums.items() if k != "masked_tokens"}
        logger.step(step - 1, consumed, record, engine, elapsed, len(micro_batches))
        if cfg.eval_iters and (step % cfg.eval_interval == 0 or step == cfg.train_iters):
            logger.eval(step, evaluate(engine, model, valid_loader, cfg.eval_iters, ctx.device))
        stop = preemption.stop_requested(ctx.device)
        due = cfg.save is not None and (
            (save_every and step % save_every == 0) or step == cfg.train_iters or stop)
        if due:
            checkpoint.save(engine, cfg.save, step,
                            run_record(cfg, model_cfg, ctx, ds, step, consumed, data_dir),
                            {"importance": model.importance.state_dict()}, keep_last=cfg.keep_last)
            logger.event("checkpoint", step=step, path=str(Path(cfg.save) / checkpoint.tag_for(step)))
        if stop:
            stopped_by_signal = True
            logger.event("preempted", step=step, saved=bool(due))
            break
    summary = logger.finish(step, consumed, stopped_by_signal)
    return summary


def _load_hf_weights(model: PretrainingModel, folder: Path) -> None:
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    from sctd_dist.hf import load_hf_state_dict

    hf = HFBertForMaskedLM.from_pretrained(folder)
    load_hf_state_dict(model.mlm, hf.state_dict())


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = train(cfg)
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.get("rank0"):
        print(json.dumps({k: v for k, v in summary.items() if k != "rank0"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
