"""Partition-aware token-dropping router (SPEC 2.1 selection rule, SPEC 2.3).

Per sequence, keep the ``k = floor(keep_ratio * T + 0.5)`` positions whose *input* ids have the
highest importance, in ascending position order, ties broken by position (lower wins).

Why it is partition-aware:

* **TP**: selection is a pure function of (ids, mask, table) using a *stable* sort and no
  randomness, so every tensor-parallel rank routes bit-identically given identical inputs.
* **SP**: the sequence is split into ``tp_size`` contiguous slices; exactly ``k / tp_size``
  positions are kept inside every slice (same rule within the slice), so the all-gather /
  reduce-scatter around attention and MLP see equal shapes on every rank, and the gathered kept
  tokens (slice 0's, then slice 1's, ...) are already in global ascending order.
* Padding: positions with ``attention_mask == 0`` rank below everything (even the pinned
  ``-1e4`` of [PAD]), so they are dropped first whatever their id.

Note: under SP a slice keeps exactly ``k / tp_size`` tokens even when it holds more pinned
(special / [MASK]) tokens than that or is mostly padding; "always kept" holds per slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sctd_dist.model.importance import TokenImportance

__all__ = ["Routing", "num_kept", "route", "gather_tokens", "scatter_tokens"]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _ratio_str(k: int, seq_length: int) -> str:
    """Shortest decimal (>= 3 places) ratio r with floor(r*T + 0.5) == k, for error messages."""
    for digits in range(3, 12):
        r = round(k / seq_length, digits)
        if 0.0 < r <= 1.0 and _round_half_up(r * seq_length) == k:
            s = f"{r:.{digits}f}".rstrip("0")
            return s + "0" if s.endswith(".") else s
    return repr(k / seq_length)


def num_kept(
    seq_length: int, keep_ratio: float, tp_size: int = 1, sequence_parallel: bool = False
) -> int:
    """Number of kept positions per sequence, ``floor(keep_ratio * seq_length + 0.5)``.

    ``keep_ratio`` is in ``(0, 1]`` (`TokenDropConfig`). Raises ``ValueError`` with an
    actionable message when it keeps no token of ``seq_length``; or, under sequence parallelism,
    ``seq_length`` is not divisible by ``tp_size`` or ``k`` is not (the message names the
    nearest valid keep ratios).
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size <= 0:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    # The ratio's range is checked where the value is set (`TokenDropConfig`).
    k = _round_half_up(float(keep_ratio) * seq_length)
    if k == 0:
        raise ValueError(
            f"keep ratio {keep_ratio} keeps no token of {seq_length}; "
            f"the smallest usable ratio is {_ratio_str(1 if not sequence_parallel else tp_size, seq_length)}"
        )
    if sequence_parallel and tp_size > 1:
        if seq_length % tp_size:
            lo = seq_length - seq_length % tp_size
            hi = lo + tp_size
            options = " or ".join(str(x) for x in (lo, hi) if x > 0)
            raise ValueError(
                f"sequence length {seq_length} is not divisible by TP={tp_size}: sequence "
                f"parallelism splits it into equal slices; use a sequence length of {options}"
            )
        if k % tp_size:
            lo = k - k % tp_size
            hi = lo + tp_size
            opts = [
                f"{_ratio_str(c, seq_length)} (k={c})" for c in (lo, hi) if 0 < c <= seq_length
            ]
            raise ValueError(
                f"keep ratio {keep_ratio} gives k={k} tokens of {seq_length}, not divisible by "
                f"TP={tp_size} (sequence parallelism keeps k/TP tokens in every slice); "
                f"use {' or '.join(opts)}"
            )
    return k


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields make a generated __eq__ ambiguous
class Routing:
    """The result of :func:`route` for one micro-batch.

    Attributes:
        kept: ``[b, k]`` int64 global positions, ascending per row.
        kept_local: ``[b, k / tp_size]`` positions *inside this rank's SP slice* (0-based within
            the slice), ascending; the same tensor as ``kept`` when not sequence parallel.
        key_mask_all: ``[b, T]`` bool, True = real (non-pad) key: for the split layer
            (kept queries x all keys).
        key_mask_kept: ``[b, k]`` bool, ``key_mask_all`` gathered at ``kept``: for the kept-only
            layers (under SP, after the all-gather the kept tokens are in ``kept`` order).
        seq_length, num_kept: the full sequence length and ``k``.
    """

    kept: torch.Tensor
    kept_local: torch.Tensor
    key_mask_all: torch.Tensor
    key_mask_kept: torch.Tensor
    seq_length: int
    num_kept: int


def route(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    importance: TokenImportance | torch.Tensor,
    keep_ratio: float,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    sequence_parallel: bool = False,
) -> Routing:
    """Select the positions to keep through the token-dropping layers.

    Args:
        input_ids: ``[b, T]`` input ids *after* masking (so [MASK] positions score high).
        attention_mask: ``[b, T]``, nonzero = real token, 0 = padding (``None``: all real).
        importance: a :class:`TokenImportance` or its ``[V]`` scores table.
        keep_ratio: fraction of positions kept, in ``(0, 1]``.
        tp_size, tp_rank: tensor-parallel size and this rank (used under SP).
        sequence_parallel: keep exactly ``k / tp_size`` positions inside every contiguous
            slice of ``T / tp_size`` positions.

    Every rank given identical inputs returns bit-identical indices (stable sort, no
    randomness); the whole batch is handled by two batched sorts (no Python loop).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    b, seq = input_ids.shape
    k = num_kept(seq, keep_ratio, tp_size, sequence_parallel)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is out of range for tp_size {tp_size}")

    table = importance.scores if isinstance(importance, TokenImportance) else importance
    if not isinstance(table, torch.Tensor) or table.dim() != 1:
        raise ValueError("importance must be a TokenImportance or a 1-D [vocab] scores tensor")
    if table.device != input_ids.device:
        raise ValueError(
            f"importance table is on {table.device} but input_ids are on {input_ids.device}"
        )
    device = input_ids.device

    if attention_mask is None:
        key_mask_all = torch.ones(b, seq, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        key_mask_all = attention_mask.to(device) != 0

    tp = tp_size if sequence_parallel else 1
    s_local, k_local = seq // tp, k // tp
    if k == seq:  # keep everything: skip the sorts
        local = torch.arange(s_local, device=device).expand(b, tp, s_local)
    else:
        scores = table[input_ids].to(torch.float32)
        # Why: padding goes strictly below every real token, whatever its id's score.
        scores = scores.masked_fill(~key_mask_all, float("-inf"))
        # Descending *stable* sort: among equal scores the lower position comes first. One
        # batched sort over the [b, tp, T/tp] view does every SP slice at once.
        order = torch.sort(scores.view(b, tp, s_local), dim=-1, descending=True, stable=True)
        local = torch.sort(order.indices[..., :k_local], dim=-1).values  # back to position order
    offsets = torch.arange(tp, device=device, dtype=torch.long).mul_(s_local)
    kept = (local + offsets.view(1, tp, 1)).reshape(b, k)
    kept_local = local[:, tp_rank].contiguous() if sequence_parallel else kept
    key_mask_kept = torch.gather(key_mask_all, 1, kept)
    return Routing(
        kept=kept,
        kept_local=kept_local,
        key_mask_all=key_mask_all,
        key_mask_kept=key_mask_kept,
        seq_length=seq,
        num_kept=k,
    )


def _full_index(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Expand a ``[b, k]`` index to ``[b, k, h]`` for ``hidden`` ``[b, s, h]`` (a view: no copy)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D, got shape {tuple(hidden.shape)}")
    if index.dim() != 2:
        raise ValueError(f"index must be [batch, k], got shape {tuple(index.shape)}")
    if index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index batch size {index.shape[0]} != hidden batch size {hidden.shape[0]}")
    return index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` at ``index``: ``[b, s, h]``, ``[b, k]`` -> ``[b, k, h]``.

    Autograd-friendly (``torch.gather``).
    """
    return torch.gather(hidden, 1, _full_index(hidden, index))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place: ``base`` with the rows at ``index`` replaced by ``values``.

    ``[b, s, h]``, ``[b, k]``, ``[b, k, h]`` -> ``[b, s, h]``. Gradients flow to ``base`` at the
    rows not replaced and to ``values``. Indices must be unique per row (as :func:`route`
    produces), which also keeps the backward deterministic on GPU.
    """
    idx = _full_index(base, index)
    if values.shape != idx.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != expected {tuple(idx.shape)}")
    return base.scatter(1, idx, values)
