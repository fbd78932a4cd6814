"""Shared fixtures for the model tests: a small config, a fixed batch, HF reference weights."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from sctd_dist.model.config import BertModelConfig

VOCAB = 300  # padded to 384 (TP=1) or 512 (TP=2, 4): padding is exercised at every size
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def small_config(**overrides) -> BertModelConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                  num_hidden_layers=4, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    values.update(overrides)
    return BertModelConfig.from_preset("tiny", **values)


def make_batch(batch: int = 3, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] ... [SEP] rows with one padded row and ~20% masked-LM targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    ids[:, 0] = SPECIAL["cls"]
    attention = torch.ones_like(ids)
    lengths = [seq] * batch
    lengths[-1] = seq - 5
    labels = torch.full_like(ids, -100)
    for b, n in enumerate(lengths):
        ids[b, n - 1] = SPECIAL["sep"]
        ids[b, n:] = SPECIAL["pad"]
        attention[b, n:] = 0
        pick = torch.randperm(n - 2, generator=g)[: max(1, (n - 2) // 5)] + 1
        labels[b, pick] = ids[b, pick]
        ids[b, pick[: len(pick) // 2 + 1]] = SPECIAL["mask"]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def hf_reference_state(cfg: BertModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of a randomly initialised transformers.BertForMaskedLM (biases made non-zero)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg.to_hf_config())
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():
        if name.endswith("bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return {k: v.clone() for k, v in state.items()}


@contextlib.contextmanager
def captured_logits(model) -> Iterator[list[torch.Tensor]]:
    """Collects the vocab-parallel logits [n_masked, V_padded/tp] of every forward of `model`'s
    (a BertForMaskedLM or ModernBertForMaskedLM) MLM head. The head fuses its decoder with the
    loss and keeps no logits, so they are recomputed here from the transformed rows, this rank's
    weight shard and bias."""
    seen: list[torch.Tensor] = []
    modern = hasattr(model, "decoder")
    head = model.decoder if modern else model.cls.predictions
    transform = model.head if modern else head.transform
    weight = (model.model.embeddings.tok_embeddings if modern else model.bert.embeddings.word_embeddings).weight

    def logits(module, args, out: torch.Tensor) -> None:
        bias = head.bias + head.padding_bias.to(head.bias.dtype)
        seen.append(F.linear(out.detach(), weight.detach(), bias.detach()).float())

    hook = transform.register_forward_hook(logits)
    try:
        yield seen
    finally:
        hook.remove()
