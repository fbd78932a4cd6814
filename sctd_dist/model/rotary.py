"""Rotary position embeddings (RoFormer; as transformers' ModernBERT applies them).

Angles come from each token's ORIGINAL position: under token dropping the kept tokens are
gathered out of order of their slots, but their positions travel with them, so attention scores
between kept tokens equal those in the full sequence.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies theta^(-2i/d)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [b, 1, n, head_dim] fp32, for positions [b, n]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [b, heads, n, head_dim] by `angles`, computed in fp32, returned in x's dtype."""
    cos, sin = angles
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
