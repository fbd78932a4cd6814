"""Seeding: DP replicas differ, TP ranks share the replicated stream and differ in the sharded one;
activation checkpointing recomputes the same dropout masks."""

from __future__ import annotations

import torch

from tests.distributed import run_ranks


def draw_streams(rank: int, world: int, tp: int):
    from sctd_dist.parallel import initialize
    from sctd_dist.parallel.random import SHARDED_RNG

    ctx = initialize(tp, seed=7)
    replicated = torch.rand(4)
    with SHARDED_RNG.fork(ctx.device):
        sharded = torch.rand(4)
    after = torch.rand(4)  # the fork must not disturb the replicated stream
    return {"tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank, "replicated": replicated,
            "sharded": sharded, "after": after}


def test_streams_over_tp2_dp2():
    r = run_ranks(draw_streams, 4, 2)
    by = {(x["dp_rank"], x["tp_rank"]): x for x in r}
    for dp in (0, 1):
        a, b = by[(dp, 0)], by[(dp, 1)]
        assert torch.equal(a["replicated"], b["replicated"])
        assert torch.equal(a["after"], b["after"])
        assert not torch.equal(a["sharded"], b["sharded"])
    assert not torch.equal(by[(0, 0)]["replicated"], by[(1, 0)]["replicated"])
    assert not torch.equal(by[(0, 0)]["sharded"], by[(1, 0)]["sharded"])


def checkpointed_grads(rank: int, world: int):
    import dataclasses

    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.parallel import initialize
    from sctd_dist.parallel.random import SHARDED_RNG
    from tests.model.common import hf_reference_state, make_batch, small_config

    ctx = initialize(2, seed=11)
    grads = {}
    state = hf_reference_state(small_config())
    sharded_start = SHARDED_RNG.get_states()
    for recompute in (False, True):
        cfg = dataclasses.replace(small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2),
                                  activation_checkpointing=recompute)
        model = BertForMaskedLM(cfg, ctx).train()
        load_hf_state_dict(model, state)
        torch.manual_seed(5)
        SHARDED_RNG.set_states(sharded_start)
        out = model(**make_batch())
        out.loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads


def test_activation_checkpointing_replays_dropout_under_tp():
    for g in run_ranks(checkpointed_grads, 2):
        for name in g[False]:
            torch.testing.assert_close(g[True][name], g[False][name], rtol=1e-6, atol=1e-7, msg=name)


def test_sharded_states_are_keyed_by_device_type():
    """A checkpointed stream resumes whatever local device index the rank gets, and snapshots
    keyed "cuda:N" (older checkpoints) are found under the device type."""
    from sctd_dist.parallel.random import ShardedRNG

    rng = ShardedRNG()
    rng.seed(7, torch.device("cpu"))
    assert set(rng.get_states()) == {"cpu"}
    state = rng.get_states()["cpu"]
    rng.set_states({"cuda:3": state, "cpu": state})
    assert set(rng.get_states()) == {"cuda", "cpu"}
    with rng.fork(torch.device("cpu")):
        drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))
