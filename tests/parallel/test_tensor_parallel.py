"""megatron-core's TP layers with our forwards (`sctd_dist.parallel.tensor_parallel`):

* every encoder layer layout (all tokens, padded, the split layer, a kept-only layer) traces as
  one graph with no break, fp32 and bf16, dropout on, TP=1 in process and TP=2 (with and without
  sequence parallelism) on two gloo ranks;
* the word-embedding gradient built from the looked-up rows alone (added into the tied
  decoder's gradient, `tied_embedding`) equals autograd's dense one at TP=1, at TP=2 and under
  a real ZeRO-3 engine.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.model.common import hf_reference_state, make_batch, small_config

LAYOUTS = ("plain", "padded", "split", "kept")
DTYPES = (torch.float32, torch.bfloat16)
DROPOUT_CFG = small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def layer_inputs(layout: str, slices: int, dtype: torch.dtype, b: int = 2, s: int = 16,
                 h: int = 64) -> tuple:
    """Arguments of `BertLayer.forward` for one layout on one rank: `slices` > 1 means sequence
    parallelism over that many ranks (each holds s/slices rows and keeps k/slices of them)."""
    k = s // 2
    s_local, k_local = s // slices, k // slices
    kept = torch.cat([r * s_local + torch.arange(k_local) for r in range(slices)]).expand(b, k)
    kept_local = torch.arange(k_local).expand(b, k_local) if slices > 1 else kept
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[-1, -3:] = False
    if layout == "kept":
        return torch.randn(b, k_local, h, dtype=dtype), mask.gather(1, kept)
    x = torch.randn(b, s_local, h, dtype=dtype)
    if layout == "plain":
        return x, None
    if layout == "padded":
        return x, mask
    return x, mask, kept, kept_local


def graph_breaks(ctx, slices: int) -> dict[tuple[str, str], tuple[int, int, list[str]]]:
    """(graphs, breaks, reasons) of `torch._dynamo.explain` per (layout, dtype), training mode."""
    from sctd_dist.model.bert import BertLayer

    torch.manual_seed(0)
    out = {}
    for dtype in DTYPES:
        layer = BertLayer(DROPOUT_CFG, ctx).to(dtype).train()
        for layout in LAYOUTS:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(layer)(*layer_inputs(layout, slices, dtype))
            out[(layout, str(dtype))] = (explained.graph_count, explained.graph_break_count,
                                         [str(r.reason)[:300] for r in explained.break_reasons])
    return out


def _assert_one_graph(results) -> None:
    for case, (graphs, breaks, reasons) in results.items():
        assert (graphs, breaks) == (1, 0), f"{case}: {graphs} graphs, {breaks} breaks: {reasons}"


def test_no_graph_break_in_any_layer_layout_tp1(ctx1) -> None:
    _assert_one_graph(graph_breaks(ctx1, slices=1))


def embedding_grads(ctx, sparse: bool) -> dict[str, torch.Tensor]:
    """Gradients after two micro-batches of an ScTD-like step: a token-dropping pass whose MLM
    loss counts, and a full pass that only feeds a [CLS] term (its lookup has no decoder
    gradient of its own), accumulated over two backward calls."""
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.model.router import route

    cfg = small_config()
    model = BertForMaskedLM(cfg, ctx)
    load_hf_state_dict(model, hf_reference_state(cfg))
    if not sparse:  # plain autograd gradients for the tied weight
        model.bert.embeddings.word_embeddings.tied = model.cls.predictions.tied = None
    importance = torch.rand(cfg.vocab_size, generator=torch.Generator().manual_seed(3))
    for seed in (0, 1):
        batch = make_batch(seed=seed)
        routing = route(batch["input_ids"], batch["attention_mask"], importance, 0.5,
                        tp_size=ctx.tp_size, tp_rank=ctx.tp_rank, sequence_parallel=ctx.sequence_parallel)
        dropped = model(**batch, routing=routing, split_layer=1, return_cls=True)
        full = model(**batch, return_cls=True)
        (dropped.loss + 0.1 * (full.cls_final - dropped.cls_final).square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def _assert_grads_equal(sparse: dict[str, torch.Tensor], dense: dict[str, torch.Tensor]) -> None:
    """The tied word-embedding gradient to 1e-6 of its own scale; every other gradient to 1e-6
    of the largest gradient entry (some, like the key bias's, are zero up to rounding)."""
    assert sparse.keys() == dense.keys()
    largest = max(g.abs().max().item() for g in dense.values())
    for name, ref in dense.items():
        got = sparse[name]
        assert got.layout == torch.strided, f"{name}: the parameter's gradient must stay dense"
        scale = ref.abs().max().item() if name == WORD_EMBEDDINGS else largest
        err = (got - ref).abs().max().item() / scale
        assert err <= 1e-6, f"{name}: error {err:.2e} of {scale:.2e}"


def _op_counts(ctx, sparse: bool) -> collections.Counter:
    from torch.profiler import profile

    with profile() as prof:
        embedding_grads(ctx, sparse)
    return collections.Counter(e.name for e in prof.events())


def test_sparse_embedding_gradient_equals_dense_tp1(ctx1) -> None:
    _assert_grads_equal(embedding_grads(ctx1, True), embedding_grads(ctx1, False))
    # Four word-embedding lookups (two passes, two micro-batches): their rows go into the
    # decoder's gradient (index_add_) instead of a dense lookup gradient each. The position and
    # token-type embeddings keep their (small) dense backward in both runs.
    ours, dense = _op_counts(ctx1, True), _op_counts(ctx1, False)
    dense_lookup = "aten::embedding_dense_backward"
    assert dense[dense_lookup] - ours[dense_lookup] == 4
    assert ours["aten::index_add_"] - dense["aten::index_add_"] >= 2  # the passes with a decoder


def tp2_rank(rank: int, world: int) -> dict:
    from sctd_dist.parallel import initialize

    base = initialize(2)
    out = {"breaks": {}, "grads": {}}
    for sp in (False, True):
        ctx = dataclasses.replace(base, sequence_parallel=sp)
        out["breaks"][sp] = graph_breaks(ctx, slices=2 if sp else 1)
        out["grads"][sp] = (embedding_grads(ctx, True), embedding_grads(ctx, False))
    return out


@pytest.fixture(scope="module")
def tp2() -> list[dict]:
    return run_ranks(tp2_rank, 2)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_no_graph_break_in_any_layer_layout_tp2(tp2, sp: bool) -> None:
    for rank in tp2:
        _assert_one_graph(rank["breaks"][sp])


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_sparse_embedding_gradient_equals_dense_tp2(tp2, sp: bool) -> None:
    for rank in tp2:
        _assert_grads_equal(*rank["grads"][sp])


ZERO3 = {
    "train_batch_size": 6, "train_micro_batch_size_per_gpu": 3, "steps_per_print": 10**6,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    # Threshold 0: every parameter is partitioned, the word embeddings included.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def zero3_rank(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Full fp32 gradients of a ZeRO-3 engine (sparse lookup) and of a plain model (dense lookup)
    with the same weights and batch (the same on both DP ranks, so the DP mean is that batch's)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.parallel import MegatronMPU, initialize

    ctx = initialize(1)
    cfg = small_config()
    state = hf_reference_state(cfg)
    reference, model = BertForMaskedLM(cfg, ctx), BertForMaskedLM(cfg, ctx)
    for m in (reference, model):
        load_hf_state_dict(m, state)
    reference.bert.embeddings.word_embeddings.tied = reference.cls.predictions.tied = None
    batch = make_batch()
    reference(**batch).loss.backward()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=ZERO3, mpu=MegatronMPU())
    assert engine.zero_optimization_stage() == 3
    engine.backward(engine(**batch).loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    return {"engine": grads, "dense": {n: p.grad for n, p in reference.named_parameters()}}


def test_sparse_embedding_gradient_equals_dense_under_zero3() -> None:
    for rank in run_ranks(zero3_rank, 2):
        assert rank["engine"][WORD_EMBEDDINGS] is not None
        _assert_grads_equal(rank["engine"], rank["dense"])
