"""The ScTD objective: consistency steps, KL terms, gradients and the importance update."""

from __future__ import annotations

import torch

from sctd_dist.hf import load_hf_state_dict
from sctd_dist.model.config import TokenDropConfig
from sctd_dist.model.consistency import cls_kl
from sctd_dist.model.pretraining import PretrainingModel, check_layout
from sctd_dist.special_tokens import SpecialTokenIds
from tests.model.common import SPECIAL, hf_reference_state, make_batch, small_config

SPECIALS = SpecialTokenIds(cls=SPECIAL["cls"], sep=SPECIAL["sep"], mask=SPECIAL["mask"],
                      unk=SPECIAL["unk"], pad=SPECIAL["pad"])
CFG = small_config()


def _count_encoder_passes(model: PretrainingModel) -> list[int]:
    """A one-element counter of the forward passes of the model's encoder."""
    count = [0]
    model.mlm.bert.encoder.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _model(ctx, **drop) -> PretrainingModel:
    model = PretrainingModel(CFG, TokenDropConfig(**drop), SPECIALS, ctx)
    load_hf_state_dict(model.mlm, hf_reference_state(CFG, seed=4))
    return model


def test_kl_is_the_textbook_definition():
    p, q = torch.randn(3, 8), torch.randn(3, 8)
    ref = sum(torch.sum(p[i].softmax(-1) * (p[i].log_softmax(-1) - q[i].log_softmax(-1))) for i in range(3))
    torch.testing.assert_close(cls_kl(p, q), ref)
    assert cls_kl(p, p) == 0


def test_sctd_step_runs_two_passes_and_off_steps_one(ctx1):
    model = _model(ctx1, mode="sctd", sctd_interval=3)
    batch = make_batch(seq=16)
    passes = []
    encoder_passes = _count_encoder_passes(model)
    for step in range(6):
        before = encoder_passes[0]
        out = model(batch, step=step)
        passes.append(encoder_passes[0] - before)
        assert ("kl_local" in out.metrics) == (step % 3 == 0)
    assert passes == [2, 1, 1, 2, 1, 1]


def test_kl_terms_positive_and_every_parameter_gets_gradient(ctx1):
    model = _model(ctx1, mode="sctd")
    out = model(make_batch(seq=16), step=0)
    assert out.metrics["kl_local"] > 0 and out.metrics["kl_global"] > 0
    expected = out.metrics["mlm_loss"] + 0.05 * (out.metrics["kl_local"] + out.metrics["kl_global"])
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_kl_terms_vanish_when_nothing_is_dropped(ctx1):
    model = _model(ctx1, mode="sctd", keep_ratio=1.0)
    out = model(make_batch(seq=16), step=0)
    assert out.metrics["kl_local"] == 0 and out.metrics["kl_global"] == 0


def test_full_pass_mlm_weight_adds_its_loss(ctx1):
    model = _model(ctx1, mode="sctd", full_mlm_weight=0.5)
    out = model(make_batch(seq=16), step=0)
    m = out.metrics
    expected = m["mlm_loss"] + 0.05 * (m["kl_local"] + m["kl_global"]) + 0.5 * m["full_mlm_loss"]
    torch.testing.assert_close(out.loss.detach(), expected)


def test_mode_none_is_the_plain_model(ctx1):
    model = _model(ctx1, mode="none")
    batch = make_batch(seq=16)
    encoder_passes = _count_encoder_passes(model)
    out = model(batch, step=0)
    assert encoder_passes[0] == 1
    direct = model.mlm(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(out.loss, direct.loss)


def test_importance_update_uses_the_dropping_pass_losses(ctx1):
    model = _model(ctx1, mode="vanilla", importance_beta=0.9)
    batch = make_batch(seq=16)
    before = model.importance.scores.clone()
    routing = model.routing(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = model.mlm(batch["input_ids"], batch["attention_mask"], batch["labels"],
                        routing=routing, split_layer=model.split_layer)
    model(batch, step=1)
    model.update_importance()
    after = model.importance.scores
    for v in ref.targets.unique().tolist():
        if v in SPECIALS.all:
            continue
        mean = ref.per_token_loss[ref.targets == v].mean()
        torch.testing.assert_close(after[v], 0.9 * before[v] + 0.1 * mean)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[ref.targets] = False
    assert torch.equal(after[untouched], before[untouched])


def test_sequence_length_checked_against_the_layout():
    import pytest

    drop = TokenDropConfig(mode="vanilla", keep_ratio=0.5)
    with pytest.raises(ValueError, match="not divisible by TP=2"):
        check_layout(CFG, drop, 62, tp_size=2, sequence_parallel=True)
    check_layout(CFG, drop, 60, tp_size=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        check_layout(CFG, drop, 128, tp_size=2, sequence_parallel=True)


def test_evaluate_reports_the_cls_drift_of_the_dropping_path(ctx1):
    batch = make_batch(seq=16)
    plain = _model(ctx1, mode="none").eval().evaluate(batch)
    assert "eval_cls_cosine" not in plain
    dropping = _model(ctx1, mode="vanilla").eval()
    result = dropping.evaluate(batch)
    assert result["eval_loss"] == plain["eval_loss"]  # the loss itself uses all tokens
    full = dropping.mlm(**batch, return_cls=True).cls_final
    dropped = dropping.mlm(**batch, routing=dropping.routing(batch["input_ids"], batch["attention_mask"]),
                           split_layer=dropping.split_layer, return_cls=True).cls_final
    expected = torch.nn.functional.cosine_similarity(full, dropped, dim=-1).mean().item()
    assert abs(result["eval_cls_cosine"] - expected) < 1e-7 and expected < 1 - 1e-6
    assert _model(ctx1, mode="vanilla", keep_ratio=1.0).eval().evaluate(batch)["eval_cls_cosine"] > 1 - 1e-6
