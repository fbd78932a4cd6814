"""The tensor-parallel layout description against the model itself."""

from __future__ import annotations

import torch

from sctd_dist.parallel import layout
from tests.model.common import small_config


def test_layout_matches_the_partition_attributes_of_every_parameter():
    """megatron-core marks each split parameter with its partition dimension (we mark the MLM
    bias the same way); the layout must say the same for every parameter, with or without the
    engine's `mlm.` prefix."""
    from sctd_dist.model.bert import BertForMaskedLM

    model = BertForMaskedLM(small_config())
    for name, p in model.named_parameters():
        expected = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert layout.shard_dim(name) == expected, name
        assert layout.shard_dim("mlm." + name) == expected, name
    vocab = {n for n, _ in model.named_parameters() if layout.is_vocab(n)}
    assert vocab == {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"}


def test_split_then_merge_returns_the_whole_tensor_at_every_tp_size():
    vocab, hidden = 300, 8
    g = torch.Generator().manual_seed(0)
    tensors = {"mlm.bert.embeddings.word_embeddings.weight": torch.randn(vocab, hidden, generator=g),
               "mlm.cls.predictions.bias": torch.randn(vocab, generator=g),
               "mlm.bert.encoder.layer.1.output.dense.weight": torch.randn(hidden, 4 * hidden, generator=g),
               "mlm.bert.encoder.layer.1.attention.self.key.bias": torch.randn(hidden, generator=g),
               "mlm.bert.encoder.layer.1.output.LayerNorm.weight": torch.randn(hidden, generator=g)}
    for tp in (1, 2, 4):
        padded = small_config(vocab_size=vocab).padded_vocab_size(tp)
        for name, t in tensors.items():
            shards = [layout.split(t, name, tp, r, padded) for r in range(tp)]
            if layout.is_vocab(name):
                assert sum(s.shape[0] for s in shards) == padded
                assert torch.count_nonzero(torch.cat(shards)[vocab:]) == 0  # padding is zeros
            assert torch.equal(layout.merge(shards, name, vocab), t), (name, tp)
