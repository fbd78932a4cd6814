"""Building a training run: every object the loop needs, each made once, in dependency order.

What the flags and the data decide is checked before any process group exists, so a mistake
costs seconds and one line: the DeepSpeed JSON, the data folder, the vocabulary (settled from
the data before the model config is made), the model's fit to the TP/SP layout and sequence
length, and the fit of the checkpoint to resume. Then come the process groups, the data loaders, the model, the checkpointer (which
plans a resume before the engine exists), the engine and the logger.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from sctd_dist import preemption
from sctd_dist.allocator import in_use as allocator_in_use
from sctd_dist.arguments import TrainConfig
from sctd_dist.checkpoint import (DATA_POSITION, Checkpointer, ResumePlan, RNGStreams, SavePolicy,
                                  check_resume)
from sctd_dist.coordination import say
from sctd_dist.data.dataset import PackedDataset
from sctd_dist.data.loader import PretrainingDataLoader, ValidationDataLoader
from sctd_dist.data.masking import MaskingConfig
from sctd_dist.ds_config import (apply_schedule, check_device_support, load_ds_config, precision,
                                 resolve_batch_sizes, validate_with_deepspeed, zero_stage)
from sctd_dist.flops import step_flops
from sctd_dist.metrics import MetricsLogger
from sctd_dist.model.arch import ModelConfig, hf_class, run_model_config
from sctd_dist.model.pretraining import PretrainingModel, check_layout
from sctd_dist.parallel import MegatronMPU, ParallelContext, check_tp_size, initialize, launch_env
from sctd_dist.parallel.kernels import sdpa_backend
from sctd_dist.special_tokens import SpecialTokenIds


@dataclass
class Run:
    """Everything the training loop touches."""

    cfg: TrainConfig
    ctx: ParallelContext
    model: PretrainingModel
    engine: Any  # deepspeed.DeepSpeedEngine wrapping `model`
    loader: PretrainingDataLoader  # also the run's data position
    valid_loader: ValidationDataLoader | None  # None: the validation split is empty (--eval-iters 0)
    checkpointer: Checkpointer
    logger: MetricsLogger
    step_flops: Callable[[int], float]  # model FLOPs of optimizer step `step`, all ranks together
    start_step: int  # optimizer steps done before this process started


def build_run(cfg: TrainConfig) -> Run:
    """Make a new run, or resume one from the newest checkpoint in --load (default --save)."""
    preemption.install()  # first: a signal during start-up must not kill the job unsaved
    import deepspeed

    ds_file = load_ds_config(cfg.deepspeed_config)
    data_dir, train_set, valid_set = open_data(cfg)
    model_cfg = model_config(cfg, train_set.vocab_size, data_dir, train_set.special_ids)
    check_layout(model_cfg, cfg.token_drop, cfg.seq_length, cfg.tensor_model_parallel_size,
                 cfg.sequence_parallel)
    check_checkpoint_fits(cfg, model_cfg, ds_file)
    ctx = initialize(cfg.tensor_model_parallel_size, sequence_parallel=cfg.sequence_parallel, seed=cfg.seed)
    ds = prepare_ds_config(cfg, ds_file, ctx.dp_size, ctx.device.type)
    masking = MaskingConfig(whole_word_masking=cfg.whole_word_masking)
    batch, micro = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    loader = PretrainingDataLoader(train_set, global_batch_size=batch, micro_batch_size=micro,
                                   dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.seed, masking=masking)
    valid_loader = None if len(valid_set) == 0 else ValidationDataLoader(
        valid_set, micro_batch_size=micro, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.seed,
        masking=masking)
    model = PretrainingModel(model_cfg, cfg.token_drop, train_set.special_ids, ctx,
                             within_documents=cfg.within_documents)
    if cfg.init_hf is not None:
        _load_hf_weights(model, cfg.init_hf)
    model.to(ctx.device)
    if cfg.compile:
        model.compile_layers()
    checkpointer = Checkpointer(
        SavePolicy(cfg.save, cfg.save_interval, last_step=cfg.train_iters, keep_last=cfg.keep_last),
        cfg.load_dir, run_record(cfg, model_cfg, ctx, ds, data_dir, train_set),
        {"importance": model.importance, DATA_POSITION: loader, "rng": RNGStreams()},
        on_bad=cfg.on_bad_checkpoint, checkpoint_bytes=checkpoint_bytes(model, ctx),
        tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank, keep_data_position=cfg.keep_data_position)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=checkpointer.deepspeed_config(ds), mpu=MegatronMPU(), dist_init_required=False)
    start_step = checkpointer.start(engine)
    logger = MetricsLogger(cfg.log_dir, ctx.device, world_size=ctx.world_size,
                           tokens_per_step=batch * cfg.seq_length, micro_batches=loader.grad_accum,
                           total_steps=cfg.train_iters, start_step=start_step, progress=cfg.progress)
    plan = checkpointer.plan
    runtime = runtime_info(model_cfg, ctx, cfg.seq_length, precision(ds), cfg.compile)
    logger.announce(runtime)
    logger.event("start" if plan is None else "resume", step=start_step,
                 consumed_samples=loader.consumed_samples, checkpoint=None if plan is None else plan.source_tag,
                 world_size=ctx.world_size, dp_size=ctx.dp_size, tp_size=ctx.tp_size,
                 precision=str(precision(ds)), zero_stage=zero_stage(ds), **runtime)
    if plan is not None:
        log_resume_changes(logger, plan, ctx, start_step, loader.consumed_samples, cfg.keep_data_position)
    flops = partial(step_flops, model_cfg, cfg.token_drop, cfg.seq_length,
                    masking.mlm_probability * cfg.seq_length, batch)
    return Run(cfg, ctx, model, engine, loader, valid_loader, checkpointer, logger, flops, start_step)


def runtime_info(model_cfg: ModelConfig, ctx: ParallelContext, seq_length: int,
                 dtype: torch.dtype, compiled: bool) -> dict[str, Any]:
    """How this run executes: the memory allocator, the attention kernel that
    scaled_dot_product_attention picks for the layers' shapes (flash / efficient / math), and
    whether the encoder layers are compiled."""
    heads = model_cfg.num_attention_heads // ctx.tp_size
    dropout = model_cfg.attention_probs_dropout_prob
    if compiled and ctx.tp_size > 1 and dropout > 0:
        backend = "math (compiled, TP-sharded attention dropout)"  # see parallel.layers.attention
    else:
        backend = sdpa_backend(1, heads, seq_length, model_cfg.head_dim, dtype, ctx.device, dropout)
    return {"allocator": allocator_in_use(), "sdpa_backend": backend, "compile": compiled}


def check_checkpoint_fits(cfg: TrainConfig, model_cfg: ModelConfig, ds: dict[str, Any]) -> None:
    """Refuse a checkpoint in --load that this run cannot load, before any process group exists
    (the layout comes from the launcher's variables)."""
    world_size = launch_env.discover().world_size
    tp = cfg.tensor_model_parallel_size
    check_tp_size(tp, world_size)
    check_resume(cfg.load_dir, {"model": model_cfg.to_dict(), "tensor_model_parallel_size": tp,
                                "dp_size": world_size // tp, "zero_stage": zero_stage(ds)})


def log_resume_changes(logger: MetricsLogger, plan: ResumePlan, ctx: ParallelContext, step: int,
                       consumed_samples: int, keep_data_position: bool) -> None:
    """What a resume passed over or changed, as events: a `checkpoint_warning` per checkpoint or
    pointer it passed over, a `token_drop_change` / `global_batch_change` per setting changed
    since the save (those two were said on stderr when planned), a `layout_change` when the
    checkpoint was saved at another TP x DP layout, and a `data_switch` when the training data
    changed (each of the last two also one line on stderr: a run without --log-dir says so too)."""
    for line in plan.warnings:
        logger.event("checkpoint_warning", message=line)
    for change in plan.changes:
        logger.event(change["event"], step=step, checkpoint=change["checkpoint"], now=change["now"])
    saved = plan.saved
    if plan.layout_changed:
        logger.event("layout_change", checkpoint=plan.source_tag,
                     saved_tp_size=saved["tensor_model_parallel_size"], saved_dp_size=saved["dp_size"],
                     tp_size=ctx.tp_size, dp_size=ctx.dp_size,
                     not_preserved="per-rank RNG streams (reseeded for the new layout)")
        say(f"resuming {plan.source_tag}, saved at TP={saved['tensor_model_parallel_size']} x "
             f"DP={saved['dp_size']}, at TP={ctx.tp_size} x DP={ctx.dp_size}: weights, optimizer, "
             "schedule and importance table carried over, RNG streams reseeded")
    if plan.data_switch:
        logger.event("data_switch", changes=plan.data_switch, kept_position=keep_data_position,
                     consumed_samples=consumed_samples)
        changes = ", ".join(f"{flag} {old} -> {new}" for flag, (old, new) in plan.data_switch.items())
        say(f"data switch ({changes}): " + (
            f"continuing at sample {consumed_samples} (--keep-data-position)" if keep_data_position
            else "the new data starts at its first sample (--keep-data-position continues the old count)"))


def open_data(cfg: TrainConfig) -> tuple[Path, PackedDataset, PackedDataset]:
    """The prepared folder and its two splits; without --data-path the embedded sample corpus,
    built on first use and cached in --data-cache."""
    data_dir = cfg.data_path
    if data_dir is None:
        from sctd_dist.data.prepare import ensure_sample_dataset

        # Every rank calls this before any process group exists: the builder's file lock lets
        # the first build while the others wait, then reuse. One process builds (no worker
        # pool): forking from a process with torch's threads running has deadlocked here.
        data_dir = ensure_sample_dataset(cfg.data_cache, seq_length=cfg.seq_length, num_proc=1)
    train, valid = PackedDataset(data_dir, split="train"), PackedDataset(data_dir, split="validation")
    if train.seq_length != cfg.seq_length:
        raise ValueError(f"--data-path {data_dir} holds sequences of {train.seq_length} tokens but "
                         f"--seq-length is {cfg.seq_length}; prepare the data at that length or "
                         f"pass --seq-length {train.seq_length}")
    if len(valid) == 0:
        message = f"the validation split of {data_dir} is empty"
        if cfg.eval_iters:
            raise ValueError(f"{message}; prepare it with a larger --validation-fraction, or pass "
                             "--eval-iters 0 to train without evaluation")
        print(f"warning: {message}; training without evaluation (--eval-iters 0)", file=sys.stderr)
    return Path(data_dir), train, valid


def model_config(cfg: TrainConfig, data_vocab_size: int, data_dir: Path,
                 special: SpecialTokenIds | None = None) -> ModelConfig:
    """The model's config, made once: a preset takes the vocabulary of the data's tokenizer; with
    --model-config or --init-hf the model keeps its own, which must hold every id of the data."""
    model_cfg = run_model_config(cfg.model_arch, cfg.model, cfg.model_config, cfg.init_hf,
                                 cfg.activation_checkpointing, data_vocab_size, special)
    if model_cfg.vocab_size < data_vocab_size:
        raise ValueError(f"vocab_size {model_cfg.vocab_size} of the model is smaller than the "
                         f"tokenizer's {data_vocab_size} in {data_dir}; fix --model-config")
    return model_cfg


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


def checkpoint_bytes(model: PretrainingModel, ctx: ParallelContext) -> int:
    """About the size of one checkpoint of a new run, all ranks together: per parameter the
    weight and, for Adam, an fp32 master copy and two moments (16 bytes, whatever the ZeRO
    stage: the stages partition these, they do not shrink them)."""
    params = sum(p.numel() for p in model.parameters())
    return 16 * params * ctx.tp_size


def run_record(cfg: TrainConfig, model_cfg: ModelConfig, ctx: ParallelContext,
               ds: dict[str, Any], data_dir: Path, train_set: PackedDataset) -> dict[str, Any]:
    """What a checkpoint records about the run (compared on resume; the step is added at save)."""
    return {
        "model": model_cfg.to_dict(),
        "tensor_model_parallel_size": ctx.tp_size, "sequence_parallel": ctx.sequence_parallel,
        "world_size": ctx.world_size, "dp_size": ctx.dp_size, "zero_stage": zero_stage(ds),
        "global_batch_size": ds["train_batch_size"], "seq_length": cfg.seq_length,
        "token_drop": vars(cfg.token_drop).copy(), "data_path": str(Path(data_dir).resolve()),
        "tokenizer_fingerprint": train_set.metadata["tokenizer"]["fingerprint"],
        "train_config": cfg.to_dict(),
    }


def _load_hf_weights(model: PretrainingModel, folder: Path) -> None:
    from sctd_dist.hf import load_hf_state_dict

    hf = hf_class(model.mlm.config).from_pretrained(folder)
    load_hf_state_dict(model.mlm, hf.state_dict())
