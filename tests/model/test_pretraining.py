"""The ScTD objective: consistency steps, KL terms, gradients and the importance update."""

from __future__ import annotations

import pytest
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


def _model(ctx, **drop) -> PretrainingModel:
    model = PretrainingModel(CFG, TokenDropConfig(**drop), SPECIALS, ctx)
    load_hf_state_dict(model.mlm, hf_reference_state(CFG, seed=4))
    return model


def test_kl_is_the_textbook_definition():
    p, q = torch.randn(3, 8), torch.randn(3, 8)
    ref = torch.stack([torch.sum(p[i].softmax(-1) * (p[i].log_softmax(-1) - q[i].log_softmax(-1)))
                       for i in range(3)])
    torch.testing.assert_close(cls_kl(p, q), ref)
    assert torch.equal(cls_kl(p, p), torch.zeros(3))


class _Calls:
    """Counts forward calls of a module through a forward hook (the real calls, nothing stubbed)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("mix, heads_on_consistency_steps", [(0.0, 1), (0.5, 2)])
def test_consistency_steps_run_a_second_encoder_pass_and_its_head_only_when_mixed(
        ctx1, mix, heads_on_consistency_steps):
    model = _model(ctx1, mode="sctd", sctd_interval=3, mlm_mix=mix)
    encoder, head = _Calls(model.mlm.bert.encoder), _Calls(model.mlm.cls.predictions)
    batch = make_batch(seq=16)
    passes, heads = [], []
    for step in range(6):
        before = encoder.n, head.n
        out = model(batch, step=step)
        passes.append(encoder.n - before[0])
        heads.append(head.n - before[1])
        assert ("kl_local" in out.metrics) == (step % 3 == 0)
        assert ("full_mlm_loss" in out.metrics) == (step % 3 == 0 and mix > 0)
    assert passes == [2, 1, 1, 2, 1, 1]
    h = heads_on_consistency_steps
    assert heads == [h, 1, 1, h, 1, 1]


def test_sctd_step_sends_gradient_to_every_parameter(ctx1):
    model = _model(ctx1, mode="sctd")
    out = model(make_batch(seq=16), step=0)
    assert out.metrics["kl_local"] > 0 and out.metrics["kl_global"] > 0
    expected = out.metrics["mlm_loss"] + out.metrics["consistency_loss"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_kl_terms_vanish_when_nothing_is_dropped(ctx1):
    model = _model(ctx1, mode="sctd", keep_ratio=1.0)
    out = model(make_batch(seq=16), step=0)
    assert out.metrics["kl_local"] == 0 and out.metrics["kl_global"] == 0
    assert out.metrics["consistency_loss"] == 0


def test_mlm_mix_weighs_the_dropping_and_the_full_pass(ctx1):
    model = _model(ctx1, mode="sctd", mlm_mix=0.5)
    batch = make_batch(seq=16)
    out = model(batch, step=0)
    full = model.mlm(**batch).loss
    dropped = model.mlm(**batch, routing=model.routing(batch["input_ids"], batch["attention_mask"]),
                        split_layer=model.split_layer).loss
    m = out.metrics
    torch.testing.assert_close(m["full_mlm_loss"], full.detach())
    torch.testing.assert_close(m["mlm_loss"], dropped.detach())
    expected = 0.5 * dropped + 0.5 * full + m["consistency_loss"]
    torch.testing.assert_close(out.loss.detach(), expected.detach())


def test_mode_none_is_the_plain_model(ctx1):
    model = _model(ctx1, mode="none")
    batch = make_batch(seq=16)
    encoder = _Calls(model.mlm.bert.encoder)
    out = model(batch, step=0)
    assert encoder.n == 1
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
    model(batch, step=1)  # one micro-batch per step: its forward updates the table
    after = model.importance.scores
    for v in ref.targets.unique().tolist():
        if v in SPECIALS.all:
            continue
        mean = ref.per_token_loss[ref.targets == v].mean()
        torch.testing.assert_close(after[v], 0.9 * before[v] + 0.1 * mean)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[ref.targets] = False
    assert torch.equal(after[untouched], before[untouched])


def test_the_importance_table_moves_once_per_step_after_its_last_micro_batch(ctx1):
    model = _model(ctx1, mode="vanilla", importance_beta=0.9)
    model.micro_batches_per_step = 2
    first, second = make_batch(seq=16, seed=1), make_batch(seq=16, seed=2)
    before = model.importance.scores.clone()
    model(first, step=0)
    assert torch.equal(model.importance.scores, before)  # mid-step: the routing stays the same
    model(second, step=0)
    moved = model.importance.scores.clone()
    assert not torch.equal(moved, before)
    one_step = _model(ctx1, mode="vanilla", importance_beta=0.9)  # both micro-batches' losses at once
    one_step(dict((k, torch.cat([first[k], second[k]])) for k in first), step=0)
    torch.testing.assert_close(moved, one_step.importance.scores)
    model.eval()
    model(first, step=1)  # evaluation passes leave the table alone
    assert torch.equal(model.importance.scores, moved)


def test_sequence_length_checked_against_the_layout():
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
