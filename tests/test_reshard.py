"""Resuming a checkpoint at another TP x DP layout: real DeepSpeed engines on real gloo ranks.

Each spawn of ranks holds one layout. A saving spawn trains 3 steps, saves, gathers the whole
(TP-merged, ZeRO-gathered) fp32 weights and Adam moments, and trains 3 more steps: the losses of
steps 3-5 are the curve a resumed run must follow, and step 3's loss is what the saved model
gives on that batch. A resuming spawn converts the checkpoint for its layout, loads it with
DeepSpeed, gathers the same tensors and trains steps 3-5. Dropout is off, so only the order of
floating-point reductions differs between layouts. The vocabulary (8300 entries) pads to 8320
rows at TP=1 and 8448 at TP=2, so the vocabulary padding changes with every TP change.

Saving and resuming go through the run's `Checkpointer` (the training script's path). The
single-process resume also resumes once on a copy of the data folder (another --data-path): the
new data starts at its first sample, or, with `keep_data_position`, at the saved position.
"""

from __future__ import annotations

import shutil

import torch

from tests.distributed import run_ranks

SAVE_AT, STEPS = 3, 6
GLOBAL_BATCH, MICRO = 8, 2
VOCAB = 8300
STAGES = (1, 3)  # every layout pair
ALONE_STAGES = (0, 1, 3)  # TP=2 x DP=1 to TP=1 x DP=1 also without ZeRO (its own resharding path)


def _ds_config(stage: int) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_clipping": 1.0, "steps_per_print": 10**6,
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                      "weight_decay": 0.01, "torch_adam": True}},
            "scheduler": {"type": "WarmupDecayLR",
                          "params": {"total_num_steps": 20, "warmup_num_steps": 2, "warmup_max_lr": 2e-3}},
            "zero_optimization": {"stage": stage}}


class _Job:
    """One model + engine + data stream at this process's layout; with `load_dir`, resumed
    from the newest checkpoint there by a `Checkpointer`."""

    def __init__(self, ctx, stage: int, data_dir, load_dir=None, save_dir=None,
                 keep_data_position: bool = False) -> None:
        import deepspeed

        from sctd_dist.checkpoint import (DATA_POSITION, Checkpointer, RNGStreams, SavePolicy, plan_resume,
                                          resume_ds_config)
        from sctd_dist.data.dataset import PackedDataset
        from sctd_dist.data.loader import PretrainingDataLoader
        from sctd_dist.model.config import TokenDropConfig
        from sctd_dist.model.pretraining import PretrainingModel
        from sctd_dist.parallel import MegatronMPU
        from tests.model.common import small_config

        data = PackedDataset(data_dir, split="train")
        self.ctx, self.stage, self.data_dir = ctx, stage, data_dir
        self.config = small_config(vocab_size=VOCAB, max_position_embeddings=64)
        self.loader = PretrainingDataLoader(data, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO,
                                            dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=7)
        self.model = PretrainingModel(self.config, TokenDropConfig(mode="sctd", sctd_interval=2),
                                      data.special_ids, ctx, micro_batches_per_step=self.loader.grad_accum)
        plan = plan_resume(load_dir, self.record(), tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank)
        self.checkpointer = Checkpointer(
            SavePolicy(save_dir, None, last_step=SAVE_AT), load_dir, self.record(),
            {"importance": self.model.importance, DATA_POSITION: self.loader, "rng": RNGStreams()},
            plan, keep_data_position=keep_data_position)
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=list(self.model.parameters()),
            config=resume_ds_config(plan, _ds_config(stage)), mpu=MegatronMPU(),
            dist_init_required=False)
        self.start = self.checkpointer.start(self.engine)

    def record(self):
        from sctd_dist.run_record import RunRecord

        return RunRecord(model=self.config.to_dict(), tensor_model_parallel_size=self.ctx.tp_size,
                         dp_size=self.ctx.dp_size, world_size=self.ctx.world_size, zero_stage=self.stage,
                         seq_length=64, data_path=str(self.data_dir))

    def run(self, start: int, end: int) -> dict[int, float]:
        """Train optimizer steps `start`..`end`-1; their losses (mean over the global batch)."""
        import torch.distributed as dist

        losses = {}
        for step in range(start, end):
            total = torch.zeros(())
            batches = next(self.loader)
            for batch in batches:
                out = self.engine(batch, step=step)
                self.engine.backward(out.loss)
                self.engine.step()
                total += out.loss.detach()
            total /= len(batches) * self.ctx.dp_size
            if self.ctx.dp_size > 1:
                dist.all_reduce(total, group=self.ctx.dp_group)
            losses[step] = total.item()
        return losses

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
    """This process's groups at TP size `tp` (megatron-core's groups of another size are
    replaced: one spawn of ranks serves several layouts)."""
    from megatron.core import parallel_state as ps

    from sctd_dist.parallel import initialize

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tp:
        ps.destroy_model_parallel()
    # No sequence parallelism: it keeps k/TP tokens per sequence slice, which routes differently
    # from TP=1 by design, so losses would not be comparable across the layouts.
    return initialize(tp, seed=11)


def _save(tp, data_dir, root, stages=STAGES) -> dict:
    """Per ZeRO stage, from the seed: train, save at step 3, gather, continue to step 6."""
    results = {}
    for stage in stages:
        ctx = _init(tp)  # seeded again: every job starts from the seed
        job = _Job(ctx, stage, data_dir, save_dir=root / f"tp{ctx.tp_size}dp{ctx.dp_size}_z{stage}")
        early = job.run(0, SAVE_AT)
        assert job.checkpointer.after_step(SAVE_AT, stop=False) is not None
        states = job.gather()
        results[stage] = {"states": states, "losses": job.run(SAVE_AT, STEPS), "early": early}
    return results


def _resume(ctx, data_dir, root, source, stages=STAGES) -> dict:
    """Per ZeRO stage: resume the `source` layout's checkpoint, gather, train steps 3-5."""
    results = {}
    for stage in stages:
        job = _Job(ctx, stage, data_dir, load_dir=root / f"{source}_z{stage}")
        plan = job.checkpointer.plan
        assert plan.layout_changed and not plan.data_switch
        assert job.start == job.engine.global_steps == SAVE_AT
        assert job.loader.consumed_samples == SAVE_AT * GLOBAL_BATCH
        results[stage] = {"states": job.gather(), "losses": job.run(SAVE_AT, STEPS)}
    return results


def _two_ranks(rank, world, data_dir, root):
    """Save at TP=2 x DP=1 and at TP=1 x DP=2, then resume each at the other layout."""
    saved = {"tp2dp1": _save(2, data_dir, root, ALONE_STAGES), "tp1dp2": _save(1, data_dir, root)}
    resumed = {"tp2dp1": _resume(_init(1), data_dir, root, "tp2dp1"),
               "tp1dp2": _resume(_init(2), data_dir, root, "tp1dp2")}
    return saved, resumed


def _one_rank(rank, world, data_dir, root, other_data):
    """Resume TP=2 x DP=1 at TP=1 x DP=1; then (ZeRO-1) on another data folder, starting it
    over and keeping the position."""
    ctx = _init(1)
    results = _resume(ctx, data_dir, root, "tp2dp1", ALONE_STAGES)
    for keep in (False, True):
        job = _Job(ctx, 1, other_data, load_dir=root / "tp2dp1_z1", keep_data_position=keep)
        assert list(job.checkpointer.plan.data_switch) == ["--data-path"]
        assert job.start == job.engine.global_steps == SAVE_AT  # optimizer and schedule go on
        results[("data", keep)] = {"consumed": job.loader.consumed_samples,
                                   "first": job.loader.batches_for_step(0)[0]["input_ids"],
                                   "next": next(job.loader)[0]["input_ids"]}
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
    (ZeRO 1 and 3, ScTD on; ZeRO 0 too for the last). One test and two spawns, so that each
    layout is saved once. The two saving runs also show that the same seed gives the same run
    at TP=1 and TP=2."""
    saved, resumed = run_ranks(_two_ranks, 2, data_dir, tmp_path, timeout=900)[0]
    _same_run_at_both_tp_sizes(saved)
    other_data = shutil.copytree(data_dir, tmp_path / "phase2-data")
    alone = run_ranks(_one_rank, 1, data_dir, tmp_path, other_data, timeout=600)[0]
    for source, layout, results, stages in (("tp2dp1", "tp1 x dp2", resumed["tp2dp1"], STAGES),
                                            ("tp1dp2", "tp2 x dp1", resumed["tp1dp2"], STAGES),
                                            ("tp2dp1", "tp1 x dp1", alone, ALONE_STAGES)):
        for stage in stages:
            _check(results[stage], saved[source][stage], f"{source} at {layout} z{stage}")
    # Another --data-path: the new data from its first sample, or the old position when kept.
    fresh, kept = alone[("data", False)], alone[("data", True)]
    assert fresh["consumed"] == 0 and torch.equal(fresh["next"], fresh["first"])
    assert kept["consumed"] == SAVE_AT * GLOBAL_BATCH and not torch.equal(kept["next"], kept["first"])


def _same_run_at_both_tp_sizes(saved: dict) -> None:
    """The saving runs started from the same seed at TP=2 and TP=1, whose padded vocabularies
    differ: the same initial model, so the same step-0 loss and the same 6-step curve."""
    for stage in STAGES:
        tp2, tp1 = ({**saved[s][stage]["early"], **saved[s][stage]["losses"]} for s in ("tp2dp1", "tp1dp2"))
        assert sorted(tp1) == sorted(tp2) == list(range(STEPS))
        assert abs(tp1[0] - tp2[0]) < 1e-6, (stage, tp1[0], tp2[0])
        assert all(abs(tp1[s] - tp2[s]) < 1e-5 for s in tp1), (stage, tp1, tp2)
