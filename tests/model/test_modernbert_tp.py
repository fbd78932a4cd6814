"""ModernBERT at TP=2, with and without sequence parallelism, token dropping and attention within
documents, computes what TP=1 computes and what transformers computes (one spawn of 2 gloo
ranks checks every case)."""

from __future__ import annotations

import dataclasses

import torch

from tests.distributed import run_ranks
from tests.model.common import SPECIAL, VOCAB, captured_logits
from tests.model.modern_common import hf_modern_state, hf_model, modern_config, packed_batch

CFG = modern_config()
STATE = hf_modern_state(CFG, seed=4)
BATCH = packed_batch(seed=2)
IMPORTANCE = torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) * 10
IMPORTANCE[[SPECIAL["unk"], SPECIAL["cls"], SPECIAL["sep"], SPECIAL["mask"]]] = 1e4
IMPORTANCE[SPECIAL["pad"]] = -1e4
# (sequence_parallel, keep_ratio or None, attention within documents)
CASES = [(False, None, False), (False, 0.5, False), (True, None, False), (True, 0.5, False),
         (False, 0.5, True), (True, 0.5, True)]


def run_case(model, ctx, case, slices: int):
    """Forward + backward of one case; `slices` > 1 at TP=1 selects per sequence slice as
    sequence parallelism over that many ranks does."""
    import torch.distributed as dist

    from sctd_dist.hf import merge_shards
    from sctd_dist.documents import document_ids
    from sctd_dist.model.router import route

    sp, keep, within = case
    routing = None
    if keep is not None:
        per_slice = ctx.tp_size == 1 and slices > 1
        routing = route(BATCH["input_ids"], BATCH["attention_mask"], IMPORTANCE, keep,
                        tp_size=slices if per_slice else ctx.tp_size, tp_rank=ctx.tp_rank,
                        sequence_parallel=sp or per_slice)
        if per_slice:
            routing = dataclasses.replace(routing, kept_local=routing.kept)
    docs = document_ids(BATCH["input_ids"], SPECIAL["sep"]) if within else None
    model.zero_grad()
    with captured_logits(model) as seen:
        out = model(**BATCH, routing=routing, split_layer=1, return_cls=True, document_ids=docs)
    out.loss.backward()
    logits, grads = seen[0], {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if ctx.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=ctx.tp_group)
        logits = torch.cat(parts, dim=1)
        shards = [None] * ctx.tp_size
        dist.all_gather_object(shards, grads, group=ctx.tp_group)
    else:
        shards = [grads]
    merged = merge_shards(shards, model.config)
    merged.pop("decoder.weight")
    return {"kept": None if routing is None else routing.kept, "loss": out.loss.detach(),
            "cls": (out.cls_penultimate.detach(), out.cls_final.detach()), "logits": logits[:, :VOCAB],
            "grads": merged}


def tp2_cases(rank: int, world: int):
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.modernbert import ModernBertForMaskedLM
    from sctd_dist.parallel import initialize

    base = initialize(world)
    results = {}
    for case in CASES:
        ctx = dataclasses.replace(base, sequence_parallel=case[0])
        model = ModernBertForMaskedLM(CFG, ctx)
        load_hf_state_dict(model, STATE)
        results[case] = run_case(model, ctx, case, world)
    return results


def test_tp2_with_and_without_sp_matches_tp1_and_transformers(ctx1):
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.modernbert import ModernBertForMaskedLM

    ranks = run_ranks(tp2_cases, 2)
    with torch.no_grad():
        hf_logits = hf_model(CFG, STATE)(input_ids=BATCH["input_ids"],
                                         attention_mask=BATCH["attention_mask"]).logits
    for case in CASES:
        model = ModernBertForMaskedLM(CFG, ctx1)
        load_hf_state_dict(model, STATE)
        # Under SP the selection is per slice, so the TP=1 reference selects per slice too.
        ref = run_case(model, ctx1, case, 2 if case[0] else 1)
        for got in ranks:
            r = got[case]
            assert (ref["kept"] is None) == (r["kept"] is None)
            if ref["kept"] is not None:
                assert torch.equal(r["kept"], ref["kept"]), case  # the same tokens dropped
            torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
            assert (r["logits"] - ref["logits"]).abs().max() <= 1e-5, case
            for a, b in zip(r["cls"], ref["cls"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert set(r["grads"]) == set(ref["grads"])
            for name, g in ref["grads"].items():
                torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
        if case[1] is None and not case[2]:
            assert (ranks[0][case]["logits"] - hf_logits[BATCH["labels"] >= 0]).abs().max() <= 1e-5
    assert not torch.allclose(ranks[0][CASES[0]]["loss"], ranks[0][CASES[1]]["loss"])  # dropping acts
