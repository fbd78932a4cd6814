"""The semantic-consistency term of ScTD (SPEC 2.2).

On consistency steps the same weights run a second, full-token forward on the same batch; the
[CLS] vectors of the full and the token-dropping pass are pulled together at two depths. The
term is averaged per masked token, exactly like the MLM loss it is added to:

    consistency = w * sum_b (KL_local_b + KL_global_b) / n_masked

which is the released objective `(sum_masked CE + w * sum_b KL) / n_masked` written relative to
the mean MLM loss. It makes the ratio of the two terms independent of the micro-batch size, of
gradient accumulation and of the data-parallel size (duplicating a micro-batch changes nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def cls_kl(full: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Per sequence, KL(softmax(full) || softmax(dropped)) with the softmax over the hidden dim:
    [b, h] x [b, h] -> [b].

    Gradients flow into both arguments: ScTD trains both passes towards each other.
    """
    log_p = F.log_softmax(full.float(), dim=-1)
    log_q = F.log_softmax(dropped.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class Consistency(NamedTuple):
    """The consistency term of one micro-batch and the per-sequence KLs it is made of."""

    loss: torch.Tensor  # w * sum_b (KL_local_b + KL_global_b) / n_masked: what enters the loss
    kl_local: torch.Tensor  # [b] at the output of layer L-2
    kl_global: torch.Tensor  # [b] at the output of the final layer


def consistency_term(
    full_cls_penultimate: torch.Tensor,
    full_cls_final: torch.Tensor,
    drop_cls_penultimate: torch.Tensor,
    drop_cls_final: torch.Tensor,
    weight: float,
    num_masked: int,
) -> Consistency:
    """KL_local at the output of layer L-2 (the last kept-only layer, where [CLS] is always
    kept), KL_global at the final layer, and the weighted sum over the batch divided by the
    number of masked tokens the MLM loss averages over (at least 1)."""
    kl_local = cls_kl(full_cls_penultimate, drop_cls_penultimate)
    kl_global = cls_kl(full_cls_final, drop_cls_final)
    loss = weight * (kl_local.sum() + kl_global.sum()) / max(num_masked, 1)
    return Consistency(loss, kl_local, kl_global)


def cls_cosine(full: torch.Tensor, dropped: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """Mean over the batch of cos([CLS] of the full pass, [CLS] of the token-dropping pass): the
    "semantic drift" measure, 1.0 when dropping leaves the sequence representation unchanged.

    `centered` first subtracts the batch mean of the full pass's [CLS] from both. [CLS] vectors
    share a large common component (anisotropy), which keeps the raw cosine near 1 for any
    two inputs; the centered cosine compares only what makes each sequence's vector its own."""
    full, dropped = full.float(), dropped.float()
    if centered:
        mean = full.mean(dim=0, keepdim=True)
        full, dropped = full - mean, dropped - mean
    return F.cosine_similarity(full, dropped, dim=-1).mean()
