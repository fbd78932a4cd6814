"""The token-dropping layer schedule (SPEC 2.1), checked against explicit references."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sctd_dist.hf import load_hf_state_dict
from sctd_dist.model.bert import BertForMaskedLM
from sctd_dist.model.router import gather_tokens, route
from tests.model.common import VOCAB, hf_reference_state, make_batch, small_config

CFG = small_config(num_hidden_layers=6)  # split layer 2, kept-only 3-4, last 5
SPLIT = 2
TABLE = torch.rand(VOCAB, generator=torch.Generator().manual_seed(1)) * 10
TABLE[[1, 2, 3, 4]] = 1e4
TABLE[0] = -1e4


def _model(ctx) -> BertForMaskedLM:
    model = BertForMaskedLM(CFG, ctx)
    load_hf_state_dict(model, hf_reference_state(CFG, seed=2))
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_keep_ratio_one_is_bit_identical_to_no_dropping(ctx1):
    batch = make_batch(seq=20)
    model = _model(ctx1)
    base = model(**batch, return_cls=True)
    base.loss.backward()
    g_base = _grads(model)
    model.zero_grad()
    routing = route(batch["input_ids"], batch["attention_mask"], TABLE, 1.0)
    dropped = model(**batch, routing=routing, split_layer=SPLIT, return_cls=True)
    dropped.loss.backward()
    assert torch.equal(base.loss, dropped.loss)
    assert torch.equal(base.cls_final, dropped.cls_final)
    for name, g in _grads(model).items():
        assert torch.equal(g, g_base[name]), name


def _capture_layer_io(model):
    seen: dict[int, tuple] = {}

    def hook(i):
        def fn(module, args, output):
            seen[i] = (args, output)
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.bert.encoder.layer)]
    return seen, handles


def _explicit_split_layer(layer, x, kept, key_mask):
    """Plain-math cross-attention layer: queries from kept rows, keys/values from all rows."""
    att = layer.attention
    heads, d = att.self.heads, att.self.head_dim
    xq = gather_tokens(x, kept)
    lin = lambda m, t: t @ m.weight.T + m.bias  # noqa: E731
    b, k, h = xq.shape
    q = lin(att.self.query, xq).view(b, k, heads, d).transpose(1, 2)
    kk = lin(att.self.key, x).view(b, -1, heads, d).transpose(1, 2)
    v = lin(att.self.value, x).view(b, -1, heads, d).transpose(1, 2)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, k, h)
    a = F.layer_norm(lin(att.output.dense, ctx) + xq, (h,), att.output.LayerNorm.weight,
                     att.output.LayerNorm.bias, att.output.LayerNorm.eps)
    inter = F.gelu(lin(layer.intermediate.dense, a))
    out = layer.output
    return F.layer_norm(lin(out.dense, inter) + a, (h,), out.LayerNorm.weight, out.LayerNorm.bias,
                        out.LayerNorm.eps)


def test_schedule_matches_explicit_references(ctx1):
    batch = make_batch(seq=20)
    model = _model(ctx1).eval()
    routing = route(batch["input_ids"], batch["attention_mask"], TABLE, 0.5)
    seen, handles = _capture_layer_io(model)
    with torch.no_grad():
        model(**batch, routing=routing, split_layer=SPLIT)
    for h in handles:
        h.remove()
    layers = model.bert.encoder.layer
    split_in = seen[SPLIT][0][0]
    key_mask = batch["attention_mask"].bool()
    kept = routing.kept
    assert seen[SPLIT][1].shape[1] == kept.shape[1] == 10
    with torch.no_grad():
        # Split layer: kept queries attend over all keys.
        ref = _explicit_split_layer(layers[SPLIT], split_in, kept, key_mask)
        torch.testing.assert_close(seen[SPLIT][1], ref, rtol=1e-5, atol=1e-5)
        # Kept-only layers: an ordinary layer run on the gathered sub-sequence.
        x = seen[SPLIT][1]
        for i in range(SPLIT + 1, len(layers) - 1):
            x = layers[i](x, routing.key_mask_kept)
            assert torch.equal(seen[i][1], x)
    # The last layer sees dropped rows exactly as they entered the split layer, kept rows from
    # the last kept-only layer, each at its original position.
    last_in = seen[len(layers) - 1][0][0]
    dropped = torch.ones_like(key_mask)
    dropped.scatter_(1, kept, False)
    assert torch.equal(last_in[dropped], split_in[dropped])
    assert torch.equal(gather_tokens(last_in, kept), seen[len(layers) - 2][1])


def test_dropping_keeps_special_and_mask_tokens():
    batch = make_batch(seq=20)
    routing = route(batch["input_ids"], batch["attention_mask"], TABLE, 0.5)
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        kept = set(routing.kept[b].tolist())
        real = batch["attention_mask"][b].bool()
        must = [p for p in range(ids.shape[1]) if real[p] and ids[b, p].item() in (2, 3, 4)]
        assert set(must) <= kept
        # [PAD] rows go first: a padded row keeps no padding while real tokens are left.
        pads = {p for p in range(ids.shape[1]) if not real[p]}
        if int(real.sum()) >= routing.num_kept:
            assert not (kept & pads)
