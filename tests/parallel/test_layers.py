"""Sequence parallelism's replicated-parameter gradients: one bucketed all-reduce per backward,
counted on real gloo ranks (TP=2 + SP) with the profiler, which sees every c10d collective
whatever Python function issued it."""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from tests.distributed import run_ranks
from tests.model.common import make_batch, small_config

LAYERS = 4  # (24 in BERT-large) # BERT-large's depth: 6 sequence-parallel parameters per layer + 2 in the embeddings
SP_PARAMS = 6 * LAYERS + 2


def _collectives(profile) -> Counter:
    return Counter(e.name for e in profile.events() if e.name.startswith("c10d::"))


def count_step_collectives(rank: int, world: int) -> dict:
    """Forward + backward of one packed micro-batch (no padding, token dropping on) at TP=2+SP;
    the collectives of that step and whether replicated gradients agree over the TP group."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.model.router import route
    from sctd_dist.parallel import initialize

    ctx = dataclasses.replace(initialize(world), sequence_parallel=True)
    cfg = small_config(num_hidden_layers=LAYERS, hidden_dropout_prob=0.1)
    model = BertForMaskedLM(cfg, ctx)
    batch = make_batch(batch=2, seq=16)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    importance = torch.arange(cfg.vocab_size, dtype=torch.float32)
    routing = route(batch["input_ids"], batch["attention_mask"], importance, 0.5,
                    tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, sequence_parallel=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(**batch, routing=routing, split_layer=LAYERS // 2 - 1)
        out.loss.backward()
    equal = True
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        parts = [torch.empty_like(p.grad) for _ in range(world)]
        dist.all_gather(parts, p.grad.contiguous(), group=ctx.tp_group)
        equal &= all(torch.equal(t, parts[0]) for t in parts)
    return {"collectives": dict(_collectives(prof)), "replicated_equal": equal}


def test_sequence_parallel_grads_all_reduced_in_one_bucket():
    results = run_ranks(count_step_collectives, 2)
    counts = results[0]["collectives"]
    print(f"collectives of one TP=2+SP step ({LAYERS} layers): {counts}")
    assert all(r["collectives"] == counts for r in results)  # every rank issues the same calls
    assert all(r["replicated_equal"] for r in results)
    # Per-parameter all-reduces would be SP_PARAMS (146) on top of the few of the embedding and
    # the vocabulary-parallel loss; the bucket makes them one.
    assert counts.get("c10d::allreduce_", 0) <= 8, counts
    # What remains scales with the depth: the all-gather / reduce-scatter pairs around attention
    # and MLP, forward and backward (4 + 4 per layer), plus the embedding and the head.
    total = sum(counts.values())
    assert total <= 8 * LAYERS + 10, counts
