"""Shared fixtures for the ModernBERT tests: a small config whose sliding window is shorter
than the rows, transformers reference weights, and packed rows of several documents."""

from __future__ import annotations

import torch

from sctd_dist.model.modernbert_config import ModernBertModelConfig
from tests.model.common import SPECIAL, VOCAB

SEQ = 32
WINDOW = 8  # +-4 tokens: sliding layers see a fraction of a 32-token row


def modern_config(**overrides) -> ModernBertModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                  num_hidden_layers=4, local_attention=WINDOW, max_position_embeddings=64,
                  pad_token_id=SPECIAL["pad"], cls_token_id=SPECIAL["cls"], sep_token_id=SPECIAL["sep"])
    values.update(overrides)
    return ModernBertModelConfig.from_preset("tiny", **values)


def hf_modern_state(cfg: ModernBertModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised transformers.ModernBertForMaskedLM's weights, norms and the
    decoder bias perturbed (they start at 1 and 0, which would hide a missing one)."""
    from transformers import ModernBertForMaskedLM

    torch.manual_seed(seed)
    state = ModernBertForMaskedLM(cfg.to_hf_config()).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():
        if "norm" in name or name == "decoder.bias":
            t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return {k: v.clone() for k, v in state.items()}


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of [CLS] doc [SEP] doc [SEP] ..., the last one padded, ~25% MLM targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, SEQ), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    for row, seps in enumerate(([9, 20, 31], [14, 31], [11, 23])):
        ids[row, seps] = SPECIAL["sep"]
    ids[2, 24:] = SPECIAL["pad"]
    attention = (ids != SPECIAL["pad"]).long()
    special = (ids == SPECIAL["cls"]) | (ids == SPECIAL["sep"]) | (attention == 0)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.25) & ~special, ids, -100)
    inputs = torch.where((labels >= 0) & (torch.rand(ids.shape, generator=g) < 0.8), SPECIAL["mask"], ids)
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels}


def hf_model(cfg: ModernBertModelConfig, state: dict[str, torch.Tensor]):
    from transformers import ModernBertForMaskedLM

    model = ModernBertForMaskedLM(cfg.to_hf_config()).eval()
    model.load_state_dict(state)
    return model
