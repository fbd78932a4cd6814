"""Resuming a checkpoint at another TP x DP layout: real DeepSpeed engines on real gloo ranks.

Each spawn of ranks holds one layout. A saving spawn trains 3 steps, saves, gathers the whole
(TP-merged, ZeRO-gathered) fp32 weights and Adam moments, and trains 3 more steps: the losses of
steps 3-5 are the curve a resumed run must follow, and step 3's loss is what the saved model
gives on that batch. A resuming spawn converts the checkpoint for its layout, loads it with
DeepSpeed, gathers the same tensors and trains steps 3-5. Dropout is off, so only the order of
floating-point reductions differs between layouts. The vocabulary (8300 entries) pads to 8320
rows at TP=1 and 8448 at TP=2, so the vocabulary padding changes with every TP change.
"""

from __future__ import annotations

import torch

from tests.distributed import run_ranks

SAVE_AT, STEPS = 3, 6
GLOBAL_BATCH, MICRO = 8, 2
VOCAB = 8300
STAGES = (0, 1, 3)


def _ds_config(stage: int, universal: bool) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO,
           "gradient_clipping": 1.0, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                     "weight_decay": 0.01, "torch_adam": True}},
           "scheduler": {"type": "WarmupDecayLR",
                         "params": {"total_num_steps": 20, "warmup_num_steps": 2, "warmup_max_lr": 2e-3}},
           "zero_optimization": {"stage": stage}}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


class _Job:
    """One model + engine + data stream at this process's layout."""

    def __init__(self, ctx, stage: int, data_dir, universal: bool = False) -> None:
        import deepspeed

        from sctd_dist.data.dataset import PackedDataset
        from sctd_dist.data.loader import PretrainingDataLoader
        from sctd_dist.model.config import TokenDropConfig
        from sctd_dist.model.pretraining import PretrainingModel
        from sctd_dist.parallel import MegatronMPU
        from tests.model.common import small_config

        data = PackedDataset(data_dir, split="train")
        self.ctx, self.stage = ctx, stage
        self.config = small_config(vocab_size=VOCAB, max_position_embeddings=64)
        self.model = PretrainingModel(self.config, TokenDropConfig(mode="sctd", sctd_interval=2),
                                      data.special_ids, ctx)
        self.engine, *_ = deepspeed.initialize(model=self.model, model_parameters=list(self.model.parameters()),
                                               config=_ds_config(stage, universal), mpu=MegatronMPU(),
                                               dist_init_required=False)
        self.loader = PretrainingDataLoader(data, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO,
                                            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=7)

    def run(self, start: int, end: int) -> dict[int, float]:
        """Train optimizer steps `start`..`end`-1; their losses (mean over the global batch)."""
        import torch.distributed as dist

        losses = {}
        for step in range(start, end):
            total = torch.zeros(())
            batches = self.loader.batches_for_step(step * GLOBAL_BATCH)
            for batch in batches:
                out = self.engine(batch, step=step)
                self.engine.backward(out.loss)
                self.engine.step()
                total += out.loss.detach()
            self.model.update_importance()
            total /= len(batches) * self.ctx.dp_size
            if self.ctx.dp_size > 1:
                dist.all_reduce(total, group=self.ctx.dp_group)
            losses[step] = total.item()
        return losses

    def record(self, step: int) -> dict:
        return {"step": step, "consumed_samples": step * GLOBAL_BATCH, "model": self.config.to_dict(),
                "tensor_model_parallel_size": self.ctx.tp_size, "dp_size": self.ctx.dp_size,
                "world_size": self.ctx.world_size, "zero_stage": self.stage}

    def gather(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's whole fp32 weight and Adam moments (collective)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from sctd_dist.parallel import layout

        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        out = {}
        for name, p in self.engine.module.named_parameters():
            if self.stage == 0:  # no ZeRO: the torch optimizer holds the state of the parameter
                local = {"fp32": p.detach(), **{k: base.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}
            else:
                local = {"fp32": safe_get_full_fp32_param(p),
                         **{k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}}
            whole = {}
            for key, t in local.items():
                shards = [torch.empty_like(t) for _ in range(self.ctx.tp_size)]
                dist.all_gather(shards, t.detach().float().contiguous(), group=self.ctx.tp_group)
                whole[key] = layout.merge(shards, name, VOCAB)
            out[name] = whole
        return out


def _init(tp: int):
    from sctd_dist.parallel import initialize

    # No sequence parallelism: it keeps k/TP tokens per sequence slice, which routes differently
    # from TP=1 by design, so losses would not be comparable across the layouts.
    return initialize(tp, seed=11)


def _save_rank(rank, world, tp, data_dir, root):
    """Per ZeRO stage: train, save at step 3, gather, continue to step 6."""
    from sctd_dist import checkpoint

    ctx = _init(tp)
    results = {}
    for stage in STAGES:
        job = _Job(ctx, stage, data_dir)
        job.run(0, SAVE_AT)
        checkpoint.save(job.engine, root / f"tp{tp}dp{ctx.dp_size}_z{stage}", SAVE_AT, job.record(SAVE_AT),
                        {"importance": job.model.importance.state_dict()})
        states = job.gather()
        results[stage] = {"states": states, "losses": job.run(SAVE_AT, STEPS)}
    return results


def _resume_rank(rank, world, tp, data_dir, root, sources):
    """Per ZeRO stage and saved layout: convert, load, gather, train steps 3-5."""
    from sctd_dist import checkpoint, reshard

    ctx = _init(tp)
    results = {}
    for source in sources:
        for stage in STAGES:
            load_dir = root / f"{source}_z{stage}"
            tag = checkpoint.latest_tag(load_dir)
            saved = checkpoint.read_run(load_dir, tag)
            target = reshard.prepare(load_dir, tag, saved, ctx.tp_size, ctx.tp_rank, ctx.dp_rank)
            job = _Job(ctx, stage, data_dir, universal=target.universal)
            path, _ = job.engine.load_checkpoint(str(target.load_dir), tag=target.tag)
            assert path is not None
            state = torch.load(load_dir / tag / checkpoint.STATE_FILE, weights_only=False)
            job.model.importance.load_state_dict(state["importance"])
            assert job.engine.global_steps == SAVE_AT
            results[(source, stage)] = {"states": job.gather(), "losses": job.run(saved["step"], STEPS),
                                        "lr": job.engine.get_lr()[0]}
    return results


def _check(resumed: dict, reference: dict, label: str) -> None:
    for name, states in reference["states"].items():
        for key, want in states.items():
            got = resumed["states"][name][key]
            assert got.shape == want.shape, (label, name, key)
            assert torch.allclose(got, want, rtol=0, atol=1e-7 * max(1.0, want.abs().max().item())), \
                (label, name, key, (got - want).abs().max().item())
    want, got = reference["losses"], resumed["losses"]
    assert sorted(got) == list(range(SAVE_AT, STEPS)), label
    # The first resumed step: the saved model on the same batch.
    assert abs(got[SAVE_AT] - want[SAVE_AT]) < 1e-5, (label, got, want)
    for step in got:  # and the run stays on the saved run's curve
        assert abs(got[step] - want[step]) < 1e-4 * abs(want[step]), (label, step, got, want)


def test_resume_at_another_layout_continues_exactly(tmp_path, data_dir):
    """TP=2 x DP=1 resumed at TP=1 x DP=2 and at TP=1 x DP=1, TP=1 x DP=2 resumed at TP=2 x DP=1
    (ZeRO 0, 1 and 3, ScTD on). One test, so that each layout is saved once."""
    saved = {"tp2dp1": run_ranks(_save_rank, 2, 2, data_dir, tmp_path, timeout=600)[0],
             "tp1dp2": run_ranks(_save_rank, 2, 1, data_dir, tmp_path, timeout=600)[0]}
    for tp, world, source in ((1, 2, "tp2dp1"), (1, 1, "tp2dp1"), (2, 2, "tp1dp2")):
        results = run_ranks(_resume_rank, world, tp, data_dir, tmp_path, (source,), timeout=600)[0]
        for stage in STAGES:
            _check(results[(source, stage)], saved[source][stage], f"{source} at tp{tp} x dp{world // tp} z{stage}")
