"""TP=2/4, with and without sequence parallelism, compute what TP=1 computes (real gloo ranks)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.model.common import VOCAB, hf_reference_state, make_batch, small_config


def _gather_logits(logits: torch.Tensor, ctx) -> torch.Tensor:
    import torch.distributed as dist

    if ctx.tp_size == 1:
        return logits[:, :VOCAB]
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=1)[:, :VOCAB]


def _merged_grads(model) -> dict[str, torch.Tensor] | None:
    import torch.distributed as dist

    from sctd_dist.hf import merge_shards

    ctx = model.ctx
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    shards = [None] * ctx.tp_size
    dist.all_gather_object(shards, grads, group=ctx.tp_group)
    merged = merge_shards(shards, model.config)
    merged.pop("cls.predictions.decoder.weight")
    merged.pop("cls.predictions.decoder.bias")
    return merged


def run_model(rank: int, world: int, tp: int, cfg, state, batch, modes):
    """Forward+backward the same weights and batch under each SP mode; return what to compare."""
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.parallel import initialize

    base_ctx = initialize(tp)
    results = {}
    for sp in modes:
        ctx = dataclasses.replace(base_ctx, sequence_parallel=sp)
        model = BertForMaskedLM(cfg, ctx)
        load_hf_state_dict(model, state)
        out = model(**batch, return_logits=True)
        out.loss.backward()
        replicated_equal = True
        if tp > 1:
            # Replicated parameters must hold identical gradients on every TP rank.
            import torch.distributed as dist
            for n, p in model.named_parameters():
                if getattr(p, "tensor_model_parallel", False):
                    continue
                other = [torch.empty_like(p.grad) for _ in range(tp)]
                dist.all_gather(other, p.grad.contiguous(), group=ctx.tp_group)
                replicated_equal &= all(torch.equal(o, other[0]) for o in other)
        results[sp] = {
            "loss": out.loss.detach(),
            "logits": _gather_logits(out.logits, ctx),
            "grads": _merged_grads(model),
            "correct": out.num_correct,
            "replicated_equal": replicated_equal,
        }
    return results


CFG2 = small_config()
STATE = hf_reference_state(CFG2)
BATCH = make_batch()


@pytest.fixture(scope="module")
def reference():
    return run_ranks(run_model, 1, 1, CFG2, STATE, BATCH, (False,))[0][False]


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(run_model, 2, 2, CFG2, STATE, BATCH, (False, True))


@pytest.fixture(scope="module")
def tp4():
    return run_ranks(run_model, 4, 4, CFG2, STATE, BATCH, (False, True))


def _assert_matches(ref, got):
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert got["correct"] == ref["correct"]
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp2_matches_tp1(reference, tp2, sp):
    for rank_result in tp2:
        _assert_matches(reference, rank_result[sp])
        assert rank_result[sp]["replicated_equal"]


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp4_matches_tp1(reference, tp4, sp):
    for rank_result in tp4:
        _assert_matches(reference, rank_result[sp])
        assert rank_result[sp]["replicated_equal"]


def test_reference_gradients_are_nonzero(reference):
    # Guards the comparisons above against passing on all-zero gradients.
    zero = [n for n, g in reference["grads"].items() if g.abs().sum() == 0]
    assert zero == []
