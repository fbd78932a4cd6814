"""How the encoder layers run on the device: `torch.compile` of each layer, which fused
attention kernel `scaled_dot_product_attention` picks for the run's shapes, and when masked
attention runs as FlexAttention instead.

Each layer's `forward` is compiled on its own (as torchtitan compiles each transformer block):
the module hooks around it (ZeRO-3's parameter gathering, activation checkpointing) stay
eager, every layer reuses the same compiled code (parameters are graph inputs), and a graph is
specialised on the few shapes a run has (all tokens, the split layer, the kept-only layers).
The number of masked positions, which changes every step, only reaches the MLM head, which is
not compiled, so no step recompiles for it.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# Graphs per layer a run can need: {full, split, kept-only} x {train, eval} x {packed, padded}.
_RECOMPILE_LIMIT = 16


def compile_each(layers: Iterable[nn.Module], *, backend: str = "inductor") -> int:
    """Replace each module's `forward` with its compiled version, in place; returns how many.

    Static shapes (`dynamic=False`): each layout gets kernels specialised to its sizes instead of
    one symbolic-shape graph for all of them.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    count = 0
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend, dynamic=False)
        count += 1
    return count


def use_flex_attention(device: torch.device, dropout_p: float) -> bool:
    """Whether masked attention (sliding windows, documents) runs as FlexAttention with a block
    mask: on CUDA, without attention dropout (FlexAttention has none). Its Triton kernel skips
    the masked-out blocks; SDPA with a dense mask computes them and cannot use FlashAttention.
    On CPUs FlexAttention has no backward, so SDPA stays."""
    return device.type == "cuda" and dropout_p == 0.0


_FLEX = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention, compiled once per process: uncompiled it runs as unfused reference code."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling():  # inside a compiled layer: its graph fuses the call
        return flex(q, k, v, block_mask=block_mask)
    if _FLEX is None:
        _FLEX = torch.compile(flex, dynamic=False)
    return _FLEX(q, k, v, block_mask=block_mask)


def sdpa_backend(batch: int, heads: int, seq_length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, dropout_p: float, padded: bool = False) -> str:
    """The kernel `scaled_dot_product_attention` dispatches to for these shapes:
    "flash_attention", "efficient_attention", "cudnn_attention" or "math" (lower case)."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(batch, heads, seq_length, head_dim, dtype=dtype, device=device)
    mask = torch.ones(batch, 1, 1, seq_length, dtype=torch.bool, device=device) if padded else None
    choice = torch._fused_sdp_choice(q, q, q, mask, dropout_p)  # the dispatcher's own rule
    return SDPBackend(choice).name.lower()


def allow_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on a CUDA device (what
    Megatron and DeepSpeed trainers run fp32 configs with); returns whether it is on."""
    on = dtype == torch.float32 and device.type == "cuda"
    if on:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return on
