"""The ScTD consistency term is averaged per masked token, like the MLM loss (SPEC 2.2):
its size relative to the MLM loss does not depend on the micro-batch size, on gradient
accumulation or on the tensor/sequence-parallel layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from sctd_dist.hf import load_hf_state_dict
from sctd_dist.model.config import TokenDropConfig
from sctd_dist.data.tokenizer import SpecialTokenIds
from sctd_dist.model.pretraining import PretrainingModel
from tests.distributed import run_ranks
from tests.model.common import SPECIAL, VOCAB, hf_reference_state, make_batch, small_config

SPECIALS = SpecialTokenIds(**SPECIAL)
# Initial weights wide enough that dropping moves the [CLS] vectors measurably (at the usual
# 0.02 the two passes agree to ~1e-5 and every comparison below would be vacuous).
CFG = small_config(initializer_range=0.1)
STATE = hf_reference_state(CFG, seed=4)
# A fixed, non-uniform importance table (special ids pinned as the router pins them), so that
# the dropping pass keeps a non-trivial selection and the KL terms are far from 0.
IMPORTANCE = torch.rand(VOCAB, generator=torch.Generator().manual_seed(9)) * 10
IMPORTANCE[[SPECIAL["unk"], SPECIAL["cls"], SPECIAL["sep"], SPECIAL["mask"]]] = 1e4
IMPORTANCE[SPECIAL["pad"]] = -1e4
MIXES = (0.0, 0.5)
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def _model(ctx, **drop) -> PretrainingModel:
    """ScTD with weight 1 unless given: the term then shows in every gradient compared."""
    drop = {"sctd_weight": 1.0, **drop}
    model = PretrainingModel(CFG, TokenDropConfig(mode="sctd", **drop), SPECIALS, ctx)
    load_hf_state_dict(model.mlm, STATE)
    model.importance.scores.copy_(IMPORTANCE)
    return model


def _doubled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([v, v]) for k, v in batch.items()}


def _loss_and_grads(model: PretrainingModel, batch: dict[str, torch.Tensor]):
    model.zero_grad(set_to_none=True)
    out = model(batch, step=0)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_consistency_term_is_w_times_summed_kl_over_masked_tokens(ctx1):
    batch = make_batch(batch=4, seq=16, seed=3)
    model = _model(ctx1, sctd_weight=0.05)
    out = model(batch, step=0)
    full = model.mlm(**batch, return_cls=True)
    dropped = model.mlm(**batch, routing=model.routing(batch["input_ids"], batch["attention_mask"]),
                        split_layer=model.split_layer, return_cls=True)

    def kl_by_hand(p: torch.Tensor, q: torch.Tensor) -> float:
        total = 0.0
        for row_p, row_q in zip(p.detach().double(), q.detach().double()):
            prob_p, prob_q = row_p.softmax(-1), row_q.softmax(-1)
            total += float((prob_p * (prob_p.log() - prob_q.log())).sum())
        return total

    n_masked = int((batch["labels"] >= 0).sum())
    kl_sum = (kl_by_hand(full.cls_penultimate, dropped.cls_penultimate)
              + kl_by_hand(full.cls_final, dropped.cls_final))
    expected = 0.05 * kl_sum / n_masked
    m = out.metrics
    assert kl_sum > 1e-3  # the test means something only when the passes differ
    assert m["consistency_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out.loss.item() == pytest.approx(m["mlm_loss"].item() + expected, rel=1e-6)
    # The logged KLs are per-sequence means.
    assert m["kl_local"].item() == pytest.approx(
        kl_by_hand(full.cls_penultimate, dropped.cls_penultimate) / 4, rel=1e-4)
    assert m["kl_global"].item() == pytest.approx(kl_by_hand(full.cls_final, dropped.cls_final) / 4, rel=1e-4)


@pytest.mark.parametrize("mix", MIXES)
def test_duplicating_a_micro_batch_changes_neither_loss_nor_gradients(ctx1, mix):
    model = _model(ctx1, mlm_mix=mix)
    batch = make_batch(batch=3, seq=16)
    once, grads_once = _loss_and_grads(model, batch)
    twice, grads_twice = _loss_and_grads(model, _doubled(batch))
    assert once.metrics["consistency_loss"] > 1e-3
    torch.testing.assert_close(twice.loss, once.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(twice.metrics["consistency_loss"], once.metrics["consistency_loss"],
                               rtol=1e-5, atol=1e-8)
    for name, g in grads_once.items():
        torch.testing.assert_close(grads_twice[name], g, rtol=1e-5, atol=1e-7, msg=name)


def _duplication_on_ranks(rank: int, world: int) -> dict:
    """On 2 TP ranks, with and without sequence parallelism: loss and this rank's gradient
    shards of a micro-batch and of the same micro-batch duplicated."""
    from sctd_dist.parallel import initialize

    base = initialize(world)
    batch = make_batch(batch=3, seq=16)
    result = {}
    for sp in (False, True):
        ctx = dataclasses.replace(base, sequence_parallel=sp)
        for mix in MIXES:
            model = _model(ctx, mlm_mix=mix)
            once, grads_once = _loss_and_grads(model, batch)
            twice, grads_twice = _loss_and_grads(model, _doubled(batch))
            result[(sp, mix)] = (once.loss.detach(), twice.loss.detach(),
                                 once.metrics["consistency_loss"], grads_once, grads_twice)
    return result


def test_duplication_invariance_holds_under_tensor_and_sequence_parallelism():
    for rank_result in run_ranks(_duplication_on_ranks, 2):
        for (sp, mix), (once, twice, term, grads_once, grads_twice) in rank_result.items():
            assert term > 1e-3, (sp, mix)
            torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-7, msg=f"sp={sp} mix={mix}")
            for name, g in grads_once.items():
                torch.testing.assert_close(grads_twice[name], g, rtol=1e-5, atol=1e-7,
                                           msg=f"{name} sp={sp} mix={mix}")


def _equal_masks_batch(rows: int = 8, seq: int = 16, per_row: int = 3) -> dict[str, torch.Tensor]:
    """Unpadded rows with the same number of masked tokens each, so that a mean over the whole
    batch equals the mean of the two halves' means."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, VOCAB, (rows, seq), generator=g)
    ids[:, 0], ids[:, -1] = SPECIAL["cls"], SPECIAL["sep"]
    labels = torch.full_like(ids, -100)
    for r in range(rows):
        pick = torch.randperm(seq - 2, generator=g)[:per_row] + 1
        labels[r, pick] = ids[r, pick]
        ids[r, pick[:2]] = SPECIAL["mask"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _accumulated_gradients(rank: int, world: int, micro: int) -> dict:
    """One optimizer step's gradients of a real DeepSpeed engine over the same 8 rows, fed as
    micro-batches of `micro` (gradient accumulation 8 / micro)."""
    import deepspeed

    from sctd_dist.ds_config import load_ds_config, resolve_batch_sizes, validate_with_deepspeed
    from sctd_dist.parallel import MegatronMPU, initialize

    ctx = initialize(1)
    ds = resolve_batch_sizes(load_ds_config(DS_CONFIGS / "zero0_fp32.json"), 1,
                             micro_batch=micro, global_batch=8)
    validate_with_deepspeed(ds, 1)
    model = _model(ctx)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds, mpu=MegatronMPU())
    batch = _equal_masks_batch()
    metrics = []
    for start in range(0, 8, micro):
        out = engine({k: v[start:start + micro] for k, v in batch.items()}, step=0)
        engine.backward(out.loss)
        metrics.append({k: v.item() for k, v in out.metrics.items()})
        if start + micro < 8:
            engine.step()  # inside the accumulation window: gradients keep accumulating
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
    return {"accumulation": engine.gradient_accumulation_steps(), "grads": grads,
            "consistency": sum(m["consistency_loss"] for m in metrics) / len(metrics),
            "mlm": sum(m["mlm_loss"] for m in metrics) / len(metrics)}


def test_one_micro_batch_of_8_equals_two_of_4_with_accumulation():
    whole = run_ranks(_accumulated_gradients, 1, 8)[0]
    halves = run_ranks(_accumulated_gradients, 1, 4)[0]
    assert (whole["accumulation"], halves["accumulation"]) == (1, 2)
    assert whole["consistency"] > 1e-3
    # The consistency term has the same size relative to the MLM loss (no factor of 2) ...
    assert halves["consistency"] / halves["mlm"] == pytest.approx(whole["consistency"] / whole["mlm"],
                                                                 rel=1e-4)
    # ... and the accumulated gradient is the gradient of the whole batch.
    for name, g in whole["grads"].items():
        torch.testing.assert_close(halves["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
