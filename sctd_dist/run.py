"""Building a training run: every object the loop needs, each made once, in dependency order.

What the flags and the data decide is checked before any process group exists (`settle`), so
a mistake costs seconds and one line: the paths, the DeepSpeed JSON, the data folder, the
vocabulary (settled from the data before the model config is made), the model's fit to the
TP/SP layout and sequence length, and the fit of the checkpoint to resume. Then come the
process groups, the resume plan (`checkpoint.plan_resume`), the data loaders, the model, the
checkpointer, the engine (set up for the plan), the resume itself and the logger.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from sctd_dist import preemption, run_lock
from sctd_dist.allocator import in_use as allocator_in_use
from sctd_dist.arguments import TrainConfig
from sctd_dist.checkpoint import (DATA_POSITION, Checkpointer, ResumePlan, RNGStreams, SavePolicy,
                                  check_free_space, check_resume, check_writable, checkpoint_size,
                                  plan_resume, resume_ds_config)
from sctd_dist.coordination import rank0_decides, say
from sctd_dist.data.dataset import PackedDataset
from sctd_dist.data.loader import PretrainingDataLoader, ValidationDataLoader
from sctd_dist.data.masking import MaskingConfig
from sctd_dist.data.mixture import DataSource, check_sources
from sctd_dist.ds_config import (apply_lr_schedule, check_device_support, load_ds_config, precision,
                                 resolve_batch_sizes, validate_with_deepspeed, zero_stage)
from sctd_dist.flops import step_flops
from sctd_dist.lr_schedule import WSD, WSDScheduler
from sctd_dist.metrics import MetricsLogger
from sctd_dist.model.arch import ModelConfig, arch_of, hf_class, hf_model_type, run_model_config
from sctd_dist.model.pretraining import PretrainingModel, check_layout
from sctd_dist.parallel import MegatronMPU, ParallelContext, check_tp_size, initialize, launch_env
from sctd_dist.parallel.kernels import allow_tf32, sdpa_backend, use_flex_attention
from sctd_dist.run_lock import RunLock
from sctd_dist.run_record import RunRecord
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
    # model FLOPs of optimizer step `step` with `masked_tokens` predicted positions, all ranks together
    step_flops: Callable[[int, float], float]
    start_step: int  # optimizer steps done before this process started
    lock: RunLock  # rank 0's ownership of --save (empty elsewhere)


def build_run(cfg: TrainConfig) -> Run:
    """Make a new run, or resume one from the newest checkpoint in --load (default --save).

    Three phases: check everything the flags, files and the checkpoint decide (no process group
    yet), plan the resume (`plan_resume`: verify, fall back, compare records, reshard), then
    build and apply it (`Checkpointer.start`), logging what the resume changed once."""
    preemption.install()  # first: a signal during start-up must not kill the job unsaved
    lock = run_lock.for_run(cfg.save, launch_env.discover().rank, take_over=cfg.take_over,
                            stale_after_s=cfg.lock_stale_after)  # before any work: one run per --save
    import deepspeed

    settled = settle(cfg)
    ctx = initialize(cfg.tensor_model_parallel_size, sequence_parallel=cfg.sequence_parallel, seed=cfg.seed,
                     timeout_s=cfg.dist_timeout)
    plan = plan_resume(cfg.load_dir, settled.record, cfg.on_bad_checkpoint, ctx.tp_rank, ctx.dp_rank)
    ds, masking = settled.ds, MaskingConfig(mlm_probability=cfg.mlm_probability,
                                            whole_word_masking=cfg.whole_word_masking)
    train_set, batch, micro = settled.train_sets[0], ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    loader = PretrainingDataLoader(settled.train_sets, global_batch_size=batch, micro_batch_size=micro,
                                   dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.seed, masking=masking,
                                   weights=[s.weight for s in settled.sources],
                                   names=[s.path for s in settled.sources])
    valid_loader = None if len(settled.valid_set) == 0 else ValidationDataLoader(
        settled.valid_set, micro_batch_size=micro, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.seed,
        masking=masking)
    model = PretrainingModel(settled.model_cfg, cfg.token_drop, train_set.special_ids, ctx,
                             micro_batches_per_step=loader.grad_accum,
                             within_documents=cfg.within_documents)
    if cfg.init_hf is not None:
        _load_hf_weights(model, cfg.init_hf)
    model.to(ctx.device)
    if cfg.compile:
        model.compile_layers()
    if cfg.save is not None:
        size = checkpoint_size(plan, checkpoint_bytes(model, ctx))
        rank0_decides(lambda: check_free_space(Path(cfg.save), size))
    checkpointer = Checkpointer(
        SavePolicy(cfg.save, cfg.save_interval, last_step=cfg.train_iters, keep_last=cfg.keep_last),
        cfg.load_dir, settled.record, {"importance": model.importance, DATA_POSITION: loader, "rng": RNGStreams()},
        plan, keep_data_position=cfg.keep_data_position)
    wsd = settled.lr_schedule
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=resume_ds_config(plan, ds), mpu=MegatronMPU(), dist_init_required=False,
        lr_scheduler=None if wsd is None else partial(WSDScheduler, schedule=wsd))
    start_step = checkpointer.start(engine)
    logger = MetricsLogger(cfg.log_dir, ctx.device, world_size=ctx.world_size,
                           tokens_per_step=batch * cfg.seq_length, micro_batches=loader.grad_accum,
                           total_steps=cfg.train_iters, start_step=start_step, progress=cfg.progress)
    runtime = runtime_info(settled.model_cfg, ctx, cfg.seq_length, precision(ds), cfg.compile)
    runtime["tf32"] = allow_tf32(precision(ds), ctx.device)
    logger.announce(runtime)
    logger.event("start" if plan is None else "resume", step=start_step,
                 consumed_samples=loader.consumed_samples, checkpoint=None if plan is None else plan.source_tag,
                 world_size=ctx.world_size, dp_size=ctx.dp_size, tp_size=ctx.tp_size,
                 precision=str(precision(ds)), zero_stage=zero_stage(ds), **runtime,
                 data_mixture=loader.mixture, consumed_samples_by_source=loader.consumed_samples_by_source,
                 lr_schedule=None if wsd is None else wsd.describe(),
                 train_config=settled.record.train_config, deepspeed_config=ds,
                 # micro-batches with padding run attention with a mask (no FlashAttention)
                 attention_mask_share=loader.padded_share(min(cfg.train_iters - start_step, 100)))
    if lock.takeover is not None:
        logger.event("run_lock_takeover", **lock.takeover)
    if plan is not None:
        log_resume_changes(logger, plan, ctx, start_step, loader.consumed_samples, cfg.keep_data_position)

    def flops(step: int, masked_tokens: float) -> float:  # the step's own count of predicted tokens
        return step_flops(settled.model_cfg, cfg.token_drop, cfg.seq_length, masked_tokens / batch, batch, step)

    return Run(cfg, ctx, model, engine, loader, valid_loader, checkpointer, logger, flops, start_step, lock)


@dataclass(frozen=True)
class Settled:
    """What the flags, the files and the launcher decide, known before any process group."""

    ds: dict[str, Any]  # the resolved DeepSpeed config
    data_dir: Path
    train_sets: list[PackedDataset]  # one per --data-path folder
    valid_set: PackedDataset  # the first folder's
    model_cfg: ModelConfig
    record: RunRecord  # this run, as its checkpoints will record it
    sources: tuple[DataSource, ...]  # the --data-path folders and their weights
    lr_schedule: WSD | None  # --lr-schedule wsd; None: the DeepSpeed JSON's scheduler


def settle(cfg: TrainConfig) -> Settled:
    """Check everything that flags and files decide, in one process, before any process group
    exists (a mistake costs seconds and one line): the paths, the DeepSpeed JSON, the data, the
    vocabulary, the model's fit to the layout, the checkpoint to resume. Says the resolved
    configuration in the run's start event."""
    check_paths(cfg)
    ds_file = load_ds_config(cfg.deepspeed_config)
    data_dir, train_set, valid_set = open_data(cfg)
    train_sets = open_blend(cfg, train_set)
    sources = cfg.data_sources or (DataSource(1.0, str(data_dir)),)
    model_cfg = model_config(cfg, train_set.vocab_size, data_dir, train_set.special_ids)
    check_layout(model_cfg, cfg.token_drop, cfg.seq_length, cfg.tensor_model_parallel_size,
                 cfg.sequence_parallel)
    world_size, tp = launch_env.discover().world_size, cfg.tensor_model_parallel_size
    check_tp_size(tp, world_size)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"  # what `initialize` picks
    ds, wsd = prepare_ds_config(cfg, ds_file, world_size // tp, device_type)
    record = RunRecord(
        model=model_cfg.to_dict(), tensor_model_parallel_size=tp, world_size=world_size,
        dp_size=world_size // tp, zero_stage=zero_stage(ds), sequence_parallel=cfg.sequence_parallel,
        global_batch_size=ds["train_batch_size"], seq_length=cfg.seq_length,
        token_drop=asdict(cfg.token_drop), data_path=str(data_dir.resolve()), num_samples=len(train_set),
        tokenizer_fingerprint=train_set.metadata["tokenizer"]["fingerprint"],
        data_mixture=[[s.weight, s.folder, len(d)] for s, d in zip(sources, train_sets)] if len(sources) > 1
        else None, train_config=cfg.to_dict(), deepspeed_config=ds,
        segment_b_trained=None if cfg.init_hf else False)  # the loader feeds token type 0 only
    check_resume(cfg.load_dir, record)
    return Settled(ds, data_dir, train_sets, valid_set, model_cfg, record, sources, wsd)


def check_paths(cfg: TrainConfig) -> None:
    """The flags that name files and folders, checked at the start of the run (parsing touches
    no file): inputs exist, --save is a folder that takes files (made if missing)."""
    if cfg.model_config is not None and not Path(cfg.model_config).is_file():
        raise ValueError(f"--model-config {cfg.model_config} does not exist")
    for source in cfg.data_sources or ():
        if not Path(source.path).is_dir():
            raise ValueError(f"--data-path {source.path} is not a directory; prepare one with "
                             "`python -m sctd_dist.data.prepare ... --out DIR`, or omit the flag to use "
                             "the embedded sample corpus")
    if cfg.init_hf is not None and not Path(cfg.init_hf).is_dir():
        raise ValueError(f"--init-hf {cfg.init_hf} is not a Hugging Face model folder")
    if cfg.init_hf is not None:
        folder_arch = hf_model_type(Path(cfg.init_hf))  # another model type: one line naming it
        if cfg.arch not in (None, folder_arch):
            raise ValueError(f"--arch {cfg.arch} but --init-hf {cfg.init_hf} holds a {folder_arch} "
                             f"model; drop --arch or pass --arch {folder_arch}")
    if cfg.save is not None:
        check_writable(Path(cfg.save))


def runtime_info(model_cfg: ModelConfig, ctx: ParallelContext, seq_length: int,
                 dtype: torch.dtype, compiled: bool) -> dict[str, Any]:
    """How this run executes: the memory allocator, the attention kernel the layers' shapes get
    (scaled_dot_product_attention's flash / efficient / math, or FlexAttention for ModernBERT's
    masked layers on a GPU), and whether the encoder layers are compiled."""
    heads = model_cfg.num_attention_heads // ctx.tp_size
    dropout = model_cfg.attention_probs_dropout_prob
    # ModernBERT's sliding-window layers always carry a mask (see model.attention_masks).
    masked = arch_of(model_cfg) == "modernbert"
    if compiled and ctx.tp_size > 1 and dropout > 0:
        backend = "math (compiled, TP-sharded attention dropout)"  # see parallel.layers.attention
    elif masked and use_flex_attention(ctx.device, dropout):
        backend = "flex_attention (block masks)"
    else:
        backend = sdpa_backend(1, heads, seq_length, model_cfg.head_dim, dtype, ctx.device, dropout, masked)
    return {"allocator": allocator_in_use(), "sdpa_backend": backend, "compile": compiled}


def log_resume_changes(logger: MetricsLogger, plan: ResumePlan, ctx: ParallelContext, step: int,
                       consumed_samples: int, keep_data_position: bool) -> None:
    """What a resume passed over or changed, as events: a `checkpoint_warning` per checkpoint or
    pointer it passed over, a `token_drop_change` / `global_batch_change` per setting changed
    since the save (those two were said on stderr when planned), a `layout_change` when the
    checkpoint was saved at another TP x DP layout, and a `data_switch` when the training data
    changed (each of the last two also one line on stderr: a run without --log-dir says so too)."""
    for line in plan.warnings:
        say(f"warning: {line}")
        logger.event("checkpoint_warning", message=line)
    for change in plan.changes:
        say(f"note: {change['event']}: {change['checkpoint']} in the checkpoint, {change['now']} now")
        logger.event(change["event"], step=step, checkpoint=change["checkpoint"], now=change["now"])
    saved = plan.saved
    if plan.layout_changed:
        logger.event("layout_change", checkpoint=plan.source_tag,
                     saved_tp_size=saved.tensor_model_parallel_size, saved_dp_size=saved.dp_size,
                     tp_size=ctx.tp_size, dp_size=ctx.dp_size,
                     not_preserved="per-rank RNG streams (reseeded for the new layout)")
        say(f"resuming {plan.source_tag}, saved at TP={saved.tensor_model_parallel_size} x "
             f"DP={saved.dp_size}, at TP={ctx.tp_size} x DP={ctx.dp_size}: weights, optimizer, "
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
    data_dir = None if cfg.data_sources is None else cfg.data_sources[0].path
    if data_dir is None:
        from sctd_dist.data.sample_cache import ensure_sample_dataset

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


def open_blend(cfg: TrainConfig, first: PackedDataset) -> list[PackedDataset]:
    """The training splits of every --data-path folder (`first` is the first one's, opened by
    `open_data`); a blend of folders that differ in tokenizer or sequence length is refused."""
    sources = cfg.data_sources or ()
    if len(sources) < 2:
        return [first]
    others = [PackedDataset(s.path, split="train") for s in sources[1:]]
    splits = [first, *others]
    check_sources(sources, [d.seq_length for d in splits],
                  [d.metadata["tokenizer"]["fingerprint"] for d in splits])
    return splits


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


def prepare_ds_config(cfg: TrainConfig, ds: dict[str, Any], dp_size: int,
                      device_type: str) -> tuple[dict[str, Any], WSD | None]:
    """The DeepSpeed JSON, with CLI overrides and the run length applied, checked by DeepSpeed;
    and the warmup-stable-decay schedule that replaces its scheduler (None: the JSON's own)."""
    check_device_support(ds, device_type)
    ds = resolve_batch_sizes(ds, dp_size, micro_batch=cfg.micro_batch_size,
                             global_batch=cfg.global_batch_size)
    if cfg.lr is not None:
        ds = {**ds, "optimizer": {**ds.get("optimizer", {}),
                                  "params": {**ds.get("optimizer", {}).get("params", {}), "lr": cfg.lr}}}
    ds, wsd = apply_lr_schedule(ds, cfg.schedule, cfg.train_iters, cfg.lr_decay_iters)
    validate_with_deepspeed(ds, dp_size)
    return ds, wsd


def checkpoint_bytes(model: PretrainingModel, ctx: ParallelContext) -> int:
    """About the size of one checkpoint of a new run, all ranks together: per parameter the
    weight and, for Adam, an fp32 master copy and two moments (16 bytes, whatever the ZeRO
    stage: the stages partition these, they do not shrink them)."""
    params = sum(p.numel() for p in model.parameters())
    return 16 * params * ctx.tp_size


def _load_hf_weights(model: PretrainingModel, folder: Path) -> None:
    from sctd_dist.hf import load_hf_state_dict

    hf = hf_class(model.mlm.config).from_pretrained(folder)
    load_hf_state_dict(model.mlm, hf.state_dict())
