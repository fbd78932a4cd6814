"""The MLM head's padded vocabulary and the mask-free attention path on packed batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sctd_dist.model.bert import BertForMaskedLM
from sctd_dist.model.router import route

from .common import VOCAB, captured_logits, make_batch, small_config


def _model(ctx) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(small_config(), ctx).eval()


def test_padded_vocab_never_wins(ctx1) -> None:
    model = _model(ctx1)
    weight = model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        # Make the padded rows as attractive as a real row can be: still excluded.
        weight[VOCAB:] = weight[:VOCAB].abs().max() * 5
    batch = make_batch()
    with captured_logits(model) as seen:
        out = model(**batch)
    logits = seen[0]
    assert logits.shape[1] > VOCAB  # the padding exists
    real = logits[:, :VOCAB]
    assert (logits[:, VOCAB:] < real.min(dim=1, keepdim=True).values).all()
    torch.testing.assert_close(out.per_token_loss, F.cross_entropy(real, out.targets, reduction="none"))
    assert out.num_correct == (real.argmax(dim=1) == out.targets).sum()


def test_packed_batch_matches_explicit_all_true_mask(ctx1) -> None:
    model = _model(ctx1)
    batch = make_batch()
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    x = model.bert.embeddings(batch["input_ids"], torch.zeros_like(batch["input_ids"]))
    everyone = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    importance = torch.rand(VOCAB, generator=torch.Generator().manual_seed(1))
    routing = route(batch["input_ids"], batch["attention_mask"], importance, 0.5)
    encoder = model.bert.encoder
    with torch.no_grad():
        for r in (None, routing):
            masked = encoder(x, everyone, r, 1 if r else None).hidden
            unmasked = encoder(x, None, r, 1 if r else None).hidden
            torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-5)
        # The model itself drops the mask only when nothing is padded: with padding, the padded
        # (last) row's output moves and the others' stay.
        full = model(**batch, return_cls=True).cls_final
        padded = dict(batch, attention_mask=make_batch()["attention_mask"])
        moved = (model(**padded, return_cls=True).cls_final - full).abs().amax(dim=1)
        assert moved[-1] > 1e-3 and bool((moved[:-1] < 1e-5).all()), moved
