"""The semantic-consistency term of ScTD (SPEC 2.2).

On consistency steps the same weights run a second, full-token forward on the same batch; the
[CLS] vectors of the full and the token-dropping pass are pulled together at two depths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_kl(full: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """sum over the batch of KL(softmax(full) || softmax(dropped)), softmax over the hidden dim.

    Gradients flow into both arguments: ScTD trains both passes towards each other.
    """
    log_p = F.log_softmax(full.float(), dim=-1)
    log_q = F.log_softmax(dropped.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def consistency_terms(
    full_cls_penultimate: torch.Tensor,
    full_cls_final: torch.Tensor,
    drop_cls_penultimate: torch.Tensor,
    drop_cls_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL_local, KL_global): at the output of layer L-2 (the last kept-only layer, where [CLS]
    is always kept) and at the final layer."""
    return (cls_kl(full_cls_penultimate, drop_cls_penultimate),
            cls_kl(full_cls_final, drop_cls_final))


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
