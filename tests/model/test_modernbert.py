"""ModernBERT at TP=1: the forward equals transformers' ModernBertForMaskedLM (across and within
documents, with padding and sliding windows shorter than the rows), and token dropping keeps
original positions, sliding-window distances and document masks among the kept tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sctd_dist.documents import document_ids
from tests.model.common import SPECIAL, VOCAB, captured_logits
from tests.model.modern_common import (WINDOW, hf_modern_state, hf_model,
                                       modern_config, packed_batch)

CFG = modern_config()
STATE = hf_modern_state(CFG)
BATCH = packed_batch()
DOCS = document_ids(BATCH["input_ids"], SPECIAL["sep"])


def ours(ctx, cfg=CFG, state=STATE):
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.modernbert import ModernBertForMaskedLM

    model = ModernBertForMaskedLM(cfg, ctx).eval()
    load_hf_state_dict(model, state)
    return model


def logits_of(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad(), captured_logits(model) as seen:
        model(**batch, **kwargs)
    return seen[0][:, :VOCAB]


def per_document_reference(hf, batch, docs) -> torch.Tensor:
    """transformers' logits at the masked positions, each document run alone (its own
    sequence, positions from 0): what attention within documents must compute."""
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool()
        out = torch.empty(batch["input_ids"].shape[1], VOCAB)
        for d in docs[b][real].unique():
            where = (docs[b] == d) & real
            with torch.no_grad():
                out[where] = hf(input_ids=batch["input_ids"][b][where][None]).logits[0]
        rows.append(out[batch["labels"][b] >= 0])
    return torch.cat(rows)


def test_forward_matches_transformers(ctx1):
    assert BATCH["attention_mask"].min() == 0 and DOCS.max() >= 2  # padded rows of several documents
    assert CFG.local_attention < BATCH["input_ids"].shape[1]  # the sliding window matters
    hf, model = hf_model(CFG, STATE), ours(ctx1)
    with torch.no_grad():
        ref = hf(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits
    across = logits_of(model, BATCH)
    assert (across - ref[BATCH["labels"] >= 0]).abs().max() <= 1e-5
    within = logits_of(model, BATCH, document_ids=DOCS)
    assert (within - per_document_reference(hf, BATCH, DOCS)).abs().max() <= 1e-5
    assert (within - across).abs().max() > 1e-3  # the documents really were separated


def _importance(seed: int = 9) -> torch.Tensor:
    table = torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed)) * 10
    table[[SPECIAL["unk"], SPECIAL["cls"], SPECIAL["sep"], SPECIAL["mask"]]] = 1e4
    table[SPECIAL["pad"]] = -1e4
    return table


def test_keep_ratio_one_equals_no_dropping_exactly(ctx1):
    from sctd_dist.model.router import route

    model = ours(ctx1)
    routing = route(BATCH["input_ids"], BATCH["attention_mask"], _importance(), 1.0)
    for docs in (None, DOCS):
        plain = model(**BATCH, document_ids=docs, return_cls=True)
        kept_all = model(**BATCH, document_ids=docs, return_cls=True, routing=routing, split_layer=1)
        assert torch.equal(plain.loss, kept_all.loss)
        assert torch.equal(plain.cls_final, kept_all.cls_final)


def _reference_dropping(hf, batch, kept, docs, renumber: bool) -> torch.Tensor:
    """The token-dropping schedule of a 4-layer model (full, split 1, kept-only 2, full 3) made
    of transformers' own layers: the split layer's kept rows are the full layer's rows there,
    the kept-only layer sees the kept rows with their ORIGINAL positions (or 0..k-1 when
    `renumber`), the window and documents measured on those positions."""
    m = hf.model
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)

    def layer(i, x, positions, keys_real, doc):
        kind = m.config.layer_types[i]
        allowed = keys_real[:, None, :] & (doc[:, :, None] == doc[:, None, :])
        dist = positions[:, :, None] - positions[:, None, :]
        if kind == "sliding_attention":
            allowed &= dist.abs() <= WINDOW // 2
        allowed |= dist == 0
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]
        return m.layers[i](x, attention_mask=bias, position_embeddings=m.rotary_emb(x, positions, kind))

    def take(t):
        return torch.gather(t, 1, kept if t.dim() == 2 else kept[..., None].expand(-1, -1, t.shape[-1]))

    with torch.no_grad():
        x0 = layer(0, m.embeddings(input_ids=ids), pos, real, docs)
        x1 = take(layer(1, x0, pos, real, docs))
        kept_pos = torch.arange(kept.shape[1])[None].expand_as(kept) if renumber else take(pos)
        x2 = layer(2, x1, kept_pos, take(real), take(docs))
        merged = x0.scatter(1, kept[..., None].expand(-1, -1, x0.shape[-1]), x2)
        hidden = m.final_norm(layer(3, merged, pos, real, docs))
        return hf.decoder(hf.head(hidden))[batch["labels"] >= 0]


@pytest.mark.parametrize("within", [False, True], ids=["across-documents", "within-documents"])
def test_kept_tokens_keep_original_positions(ctx1, within):
    from sctd_dist.model.router import route

    hf, model = hf_model(CFG, STATE), ours(ctx1)
    routing = route(BATCH["input_ids"], BATCH["attention_mask"], _importance(), 0.5)
    # Tokens are dropped before kept ones, so renumbering the kept ones would move them.
    assert not torch.equal(routing.kept, torch.arange(routing.num_kept).expand_as(routing.kept))
    docs = DOCS if within else torch.zeros_like(DOCS)
    got = logits_of(model, BATCH, routing=routing, split_layer=1, document_ids=DOCS if within else None)
    expected = _reference_dropping(hf, BATCH, routing.kept, docs, renumber=False)
    renumbered = _reference_dropping(hf, BATCH, routing.kept, docs, renumber=True)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - renumbered).abs().max() > 1e-3  # the test tells the two apart


def _head_inputs(model, batch, docs, routing=None) -> torch.Tensor:
    seen = []
    head = model.head if hasattr(model, "head") else model.cls.predictions.transform
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**batch, document_ids=docs, routing=routing, split_layer=1)
    finally:
        hook.remove()
    return seen[0]


def _other_document_changed(batch, docs, row: int, doc: int) -> dict[str, torch.Tensor]:
    changed = {k: v.clone() for k, v in batch.items()}
    ids = changed["input_ids"]
    where = (docs == doc) & (ids > SPECIAL["mask"]) & (torch.arange(ids.shape[0])[:, None] == row)
    ids[where] = (ids[where] + 7 - 5) % (VOCAB - 5) + 5
    return changed


@pytest.mark.parametrize("arch", ["modernbert", "bert"])
def test_other_documents_do_not_change_a_documents_outputs(ctx1, arch):
    """Row 0 holds documents 0, 1, 2: change document 1's tokens and every token of documents 0
    and 2 keeps its outputs (with and without token dropping), but not when attention crosses
    documents. The importance table is uniform, so routing does not depend on the change."""
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.model.router import route
    from tests.model.common import hf_reference_state, small_config

    if arch == "bert":
        cfg = small_config()
        model = BertForMaskedLM(cfg, ctx1).eval()
        load_hf_state_dict(model, hf_reference_state(cfg))
    else:
        model = ours(ctx1)
    others = (DOCS != 1) & BATCH["attention_mask"].bool()
    batch = dict(BATCH, labels=torch.where(others, BATCH["input_ids"], -100))
    changed = _other_document_changed(batch, DOCS, row=0, doc=1)
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    uniform = torch.full((VOCAB,), 10.0)
    uniform[[SPECIAL["cls"], SPECIAL["sep"], SPECIAL["mask"]]] = 1e4
    routing = route(batch["input_ids"], batch["attention_mask"], uniform, 0.5)
    assert torch.equal(routing.kept, route(changed["input_ids"], changed["attention_mask"], uniform, 0.5).kept)
    for r in (None, routing):
        before, after = _head_inputs(model, batch, DOCS, r), _head_inputs(model, changed, DOCS, r)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
        leaked = _head_inputs(model, changed, None, r) - _head_inputs(model, batch, None, r)
        assert leaked.abs().max() > 1e-4  # across documents the change does reach them


def test_presets_equal_transformers_modernbert():
    from transformers import ModernBertConfig

    from sctd_dist.model.modernbert_config import ModernBertModelConfig

    stock = ModernBertModelConfig.from_hf_config(ModernBertConfig())
    assert dataclasses.asdict(ModernBertModelConfig.from_preset("base")) == dataclasses.asdict(stock)
    large = ModernBertModelConfig.from_preset("large")
    assert (large.num_hidden_layers, large.hidden_size, large.intermediate_size, large.num_attention_heads) == (
        28, 1024, 2624, 16)
    assert [large.is_global(i) for i in range(4)] == [True, False, False, True]
    with pytest.raises(ValueError, match="global_attn_every_nlayers"):
        ModernBertModelConfig.from_preset("tiny", {"global_attn_every_nlayers": 2})


def test_every_layer_phase_compiles_in_one_graph(ctx1):
    """`--compile`: the full, split and kept-only layers each trace as one graph, no break."""
    import torch._dynamo as dynamo

    from sctd_dist.model.router import route

    model = ours(ctx1)
    calls = []
    hooks = [model.model.layers[i].register_forward_pre_hook(  # full, split, kept-only at split 1
        lambda mod, args, kwargs: calls.append((mod, args, kwargs)), with_kwargs=True) for i in (0, 1, 2)]
    routing = route(BATCH["input_ids"], BATCH["attention_mask"], _importance(), 0.5)
    model(**BATCH, routing=routing, split_layer=1, document_ids=DOCS)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 3
    for layer, args, kwargs in calls:
        explained = dynamo.explain(layer)(*args, **kwargs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_activation_checkpointing_replays_the_same_step(ctx1):
    """Recomputing each layer in backward (dropout on) gives the same loss and gradients."""
    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.modernbert import ModernBertForMaskedLM
    from sctd_dist.model.router import route

    routing = route(BATCH["input_ids"], BATCH["attention_mask"], _importance(), 0.5)
    results = []
    for recompute in (False, True):
        cfg = modern_config(attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1,
                            activation_checkpointing=recompute)
        model = ModernBertForMaskedLM(cfg, ctx1).train()
        load_hf_state_dict(model, STATE)
        torch.manual_seed(5)
        out = model(**BATCH, routing=routing, split_layer=1, document_ids=DOCS)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_flex_attention_block_masks_equal_the_dense_masks(ctx1):
    """The GPU path (FlexAttention with block masks, compiled) computes what the CPU path
    (SDPA with dense masks) does, in every phase of the dropping schedule, windows and
    documents included. Forward only: FlexAttention has no backward on CPUs."""
    from sctd_dist.model.router import route

    model = ours(ctx1)
    assert model.model.flex_attention is False  # a CPU run keeps SDPA
    routing = route(BATCH["input_ids"], BATCH["attention_mask"], _importance(), 0.5)
    dense = logits_of(model, BATCH, routing=routing, split_layer=1, document_ids=DOCS)
    model.model.flex_attention = True
    flex = logits_of(model, BATCH, routing=routing, split_layer=1, document_ids=DOCS)
    assert (flex - dense).abs().max() <= 1e-5
