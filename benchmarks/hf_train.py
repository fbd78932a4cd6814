"""The reference arm of `train_vs_hf.py`: transformers' BertForMaskedLM (ModernBertForMaskedLM with
`--arch modernbert`) trained the way `sctd_dist/train.py` trains our model.

Same flags as train.py (`--deepspeed_config`, `--model`, `--seq-length`, batch sizes, ...; the
token-drop flags are ignored), the same data pipeline, DeepSpeed engine settings, step timer and
`metrics.jsonl` records, so the only difference between the arms is the model. Launched under
torchrun by `train_runs.run_training(..., script=HF_TRAIN_PY)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    from sctd_dist.arguments import parse_args
    from sctd_dist.data.loader import PretrainingDataLoader
    from sctd_dist.data.masking import MaskingConfig
    from sctd_dist.ds_config import load_ds_config
    from sctd_dist.flops import step_flops
    from sctd_dist.metrics import MetricsLogger, StepTimer, engine_stats
    from sctd_dist.model.arch import hf_class
    from sctd_dist.model.config import TokenDropConfig
    from sctd_dist.parallel import MegatronMPU, initialize
    from sctd_dist.run import model_config, open_data, prepare_ds_config
    from sctd_dist.train import _to_device

    cfg = parse_args(argv)
    if cfg.tensor_model_parallel_size != 1:
        print("error: the transformers reference runs at --tensor-model-parallel-size 1", file=sys.stderr)
        return 2
    data_dir, train_set, _ = open_data(cfg)
    model_cfg = model_config(cfg, train_set.vocab_size, data_dir, train_set.special_ids)
    ctx = initialize(1, seed=cfg.seed)
    ds, _ = prepare_ds_config(cfg, load_ds_config(cfg.deepspeed_config), ctx.dp_size, ctx.device.type)
    masking = MaskingConfig(mlm_probability=cfg.mlm_probability, whole_word_masking=cfg.whole_word_masking)
    batch = ds["train_batch_size"]
    loader = PretrainingDataLoader(train_set, global_batch_size=batch,
                                   micro_batch_size=ds["train_micro_batch_size_per_gpu"],
                                   dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.seed, masking=masking)
    model = hf_class(model_cfg)(model_cfg.to_hf_config()).to(ctx.device)
    accepted = {"input_ids", "attention_mask", "labels"} | (
        {"token_type_ids"} if model_cfg.arch == "bert" else set())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=ds, mpu=MegatronMPU(), dist_init_required=False)
    logger = MetricsLogger(cfg.log_dir, ctx.device, world_size=ctx.world_size,
                           tokens_per_step=batch * cfg.seq_length, micro_batches=loader.grad_accum,
                           total_steps=cfg.train_iters, start_step=0, progress=False)
    # The records' tokens/s is what the comparison reads; their FLOP columns count our model's
    # work (MLM head at the masked positions), not this one's.
    flops = step_flops(model_cfg, TokenDropConfig(mode="none"), cfg.seq_length,
                       masking.mlm_probability * cfg.seq_length, batch, 0)
    timer = StepTimer(ctx.device)
    for step in range(cfg.train_iters):
        timer.start()
        batches = next(loader)
        loss = torch.zeros(())
        for micro in batches:
            out = engine(**_to_device({k: v for k, v in micro.items() if k in accepted}, ctx.device))
            engine.backward(out.loss)
            engine.step()
            loss += out.loss.detach().float()
        numbers = {"loss": (loss / len(batches)).item(), **engine_stats(engine)}
        logger.step(step, loader.consumed_samples, numbers, timer.stop(), flops)
    logger.finish(cfg.train_iters, loader.consumed_samples, False)
    return 0

if __name__ == "__main__":
    sys.exit(main())
