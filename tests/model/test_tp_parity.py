"""TP=2/4, with and without sequence parallelism, with and without token dropping, compute what
TP=1 computes (real gloo ranks)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.model.common import VOCAB, captured_logits, hf_reference_state, make_batch, small_config


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


def initial_model(cfg, ctx) -> tuple[dict[str, torch.Tensor], bool]:
    """The whole (TP-merged) model a fresh run starts from at this TP size (same seed at every
    size), and whether its vocabulary padding rows start at zero."""
    from sctd_dist.hf import gather_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM

    model = BertForMaskedLM(cfg, ctx)
    padding = model.bert.embeddings.word_embeddings.weight[max(0, cfg.vocab_size - model.cls.predictions.vocab_start):]
    return gather_hf_state_dict(model), bool((padding == 0).all())


def run_model(rank: int, world: int, tp: int, cfg, state, batch, cases):
    """Forward+backward the same weights and batch for each (sequence_parallel, keep_ratio,
    slices) case (keep_ratio None: no token dropping; slices > 1 at TP=1: select per sequence
    slice as sequence parallelism over that many ranks does); return what to compare."""
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.model.router import route
    from sctd_dist.parallel import initialize

    base_ctx = initialize(tp)
    results = {"initial": initial_model(cfg, base_ctx)}
    for sp, keep, slices in cases:
        ctx = dataclasses.replace(base_ctx, sequence_parallel=sp)
        model = BertForMaskedLM(cfg, ctx)
        load_hf_state_dict(model, state)
        routing = None
        if keep is not None:
            per_slice = tp == 1 and slices > 1
            routing = route(batch["input_ids"], batch["attention_mask"], IMPORTANCE, keep,
                            tp_size=slices if per_slice else ctx.tp_size, tp_rank=ctx.tp_rank,
                            sequence_parallel=sp or per_slice)
            if per_slice:
                routing = dataclasses.replace(routing, kept_local=routing.kept)
        with captured_logits(model) as seen:
            out = model(**batch, routing=routing, split_layer=1, return_cls=True)
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
        results[(sp, keep, slices)] = {
            "kept": None if routing is None else routing.kept,
            "kept_local": None if routing is None else routing.kept_local,
            "cls": (out.cls_penultimate.detach(), out.cls_final.detach()),
            "loss": out.loss.detach(),
            "logits": _gather_logits(seen[0], ctx),
            "grads": _merged_grads(model),
            "correct": out.num_correct,
            "replicated_equal": replicated_equal,
        }
    return results


CFG2 = small_config()
STATE = hf_reference_state(CFG2)
BATCH = make_batch()
# A fixed importance table with the special ids pinned, so the selection is non-trivial.
IMPORTANCE = torch.rand(VOCAB, generator=torch.Generator().manual_seed(9)) * 10
IMPORTANCE[[1, 2, 3, 4]] = 1e4
IMPORTANCE[0] = -1e4
CASES = [(sp, keep) for sp in (False, True) for keep in (None, 0.5)]
TP1_CASES = [(False, None, 1), (False, 0.5, 1), (False, 0.5, 2), (False, 0.5, 4)]


def _cases(tp):
    return [(sp, keep, tp) for sp, keep in CASES]


def _reference_case(sp, keep, tp):
    # Under SP the selection is per slice, so the TP=1 reference selects per slice too.
    return (False, keep, tp if sp and keep is not None else 1)


@pytest.fixture(scope="module")
def reference():
    return run_ranks(run_model, 1, 1, CFG2, STATE, BATCH, TP1_CASES)[0]


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(run_model, 2, 2, CFG2, STATE, BATCH, _cases(2))


@pytest.fixture(scope="module")
def tp4():
    return run_ranks(run_model, 4, 4, CFG2, STATE, BATCH, _cases(4))


def _assert_matches(ref, got):
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(got["cls"], ref["cls"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert got["correct"] == ref["correct"]
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)


CASE_IDS = ["tp", "tp+drop", "tp+sp", "tp+sp+drop"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tp2_matches_tp1(reference, tp2, case):
    for rank_result in tp2:
        _assert_matches(reference[_reference_case(*case, 2)], rank_result[(*case, 2)])
        assert rank_result[(*case, 2)]["replicated_equal"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tp4_matches_tp1(reference, tp4, case):
    for rank_result in tp4:
        _assert_matches(reference[_reference_case(*case, 4)], rank_result[(*case, 4)])
        assert rank_result[(*case, 4)]["replicated_equal"]


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_every_tp_rank_routes_identically(tp2, tp4, sp):
    for results in (tp2, tp4):
        tp = len(results)
        kept = [r[(sp, 0.5, tp)]["kept"] for r in results]
        assert all(torch.equal(k, kept[0]) for k in kept)
        if sp:
            # Every sequence slice keeps k/TP tokens, and the local indices are that slice's.
            k_local = kept[0].shape[1] // tp
            slice_len = BATCH["input_ids"].shape[1] // tp
            for rank, r in enumerate(results):
                local = r[(sp, 0.5, tp)]["kept_local"]
                assert local.shape[1] == k_local
                expected = kept[0][:, rank * k_local:(rank + 1) * k_local] - rank * slice_len
                assert torch.equal(local, expected)


def test_reference_gradients_are_nonzero(reference):
    # Guards the comparisons above against passing on all-zero gradients.
    for case in TP1_CASES:
        zero = [n for n, g in reference[case]["grads"].items() if g.abs().sum() == 0]
        assert zero == [], case


def test_dropping_changes_the_result(reference):
    # Guards against a router that silently keeps everything.
    assert not torch.allclose(reference[(False, None, 1)]["loss"], reference[(False, 0.5, 1)]["loss"])


def test_same_seed_same_initial_model_at_every_tp_size(reference, tp2):
    """The vocabulary (300) pads to 384 rows at TP=1 and 512 at TP=2: only the real rows are
    drawn at random, so the padding cannot shift what is drawn after the embedding."""
    ref, ref_padding_zero = reference["initial"]
    merged = tp2[0]["initial"][0]
    assert ref_padding_zero and all(r["initial"][1] for r in tp2)  # padding rows start at zero
    assert set(merged) == set(ref)
    for name, t in ref.items():
        assert torch.equal(merged[name], t), name
