"""The reference arm of `train_vs_hf.py`: transformers' BertForMaskedLM trained the way
`sctd_dist/train.py` trains our model.

Same flags as train.py (`--deepspeed_config`, `--model`, `--seq-length`, batch sizes, ...; the
token-drop flags are ignored), the same data pipeline, DeepSpeed engine settings, step timer and
`metrics.jsonl` records, so the only difference between the arms is the model. Launched under
torchrun by `train_runs.run_training(..., script=HF_TRAIN_PY)`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import deepspeed
    from transformers import BertForMaskedLM

    from sctd_dist.arguments import parse_args
    from sctd_dist.ds_config import load_ds_config
    from sctd_dist.metrics import MetricsLogger, StepTimer
    from sctd_dist.model.config import BertModelConfig, TokenDropConfig
    from sctd_dist.parallel import MegatronMPU, initialize
    from sctd_dist.train import _to_device, build_data, prepare_ds_config

    cfg = parse_args(argv)
    if cfg.tensor_model_parallel_size != 1:
        print("error: the transformers reference runs at --tensor-model-parallel-size 1", file=sys.stderr)
        return 2
    ctx = initialize(1, seed=cfg.seed)
    ds = prepare_ds_config(cfg, load_ds_config(cfg.deepspeed_config), ctx.dp_size, ctx.device.type)
    model_cfg = BertModelConfig.from_preset(cfg.model, cfg.model_config)
    _, train_set, loader, _ = build_data(cfg, model_cfg, ctx, ds)
    if cfg.model_config is None:  # the presets take the data's vocabulary, as in train.py
        model_cfg = BertModelConfig.from_preset(cfg.model, vocab_size=train_set.vocab_size)
    model = BertForMaskedLM(model_cfg.to_hf_config()).to(ctx.device)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=ds, mpu=MegatronMPU(), dist_init_required=False)
    # The records' tokens/s is what the comparison reads; their FLOP columns count our model's
    # work (MLM head at the masked positions), not this one's.
    plain = dataclasses.replace(cfg, token_drop=TokenDropConfig(mode="none"))
    logger = MetricsLogger(cfg.log_dir, ctx, model_cfg, plain, ds, total_steps=cfg.train_iters,
                           start_step=0, progress=False)
    timer = StepTimer(ctx.device)
    consumed = 0
    for step in range(cfg.train_iters):
        timer.start()
        micro_batches = loader.batches_for_step(consumed)
        loss = torch.zeros(())
        for batch in micro_batches:
            out = engine(**_to_device(batch, ctx.device))
            engine.backward(out.loss)
            engine.step()
            loss += out.loss.detach().float()
        consumed += ds["train_batch_size"]
        elapsed = timer.stop()
        logger.step(step, consumed, {"loss": (loss / len(micro_batches)).item()}, engine, elapsed,
                    len(micro_batches))
    logger.finish(cfg.train_iters, consumed, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
