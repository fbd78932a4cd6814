"""Hugging Face interop: our TP-sharded models <-> `transformers.BertForMaskedLM` /
`transformers.ModernBertForMaskedLM`.

Our module names equal Hugging Face's, so the mapping is only about shapes: which tensors are
split over TP ranks (and along which dimension), the vocabulary padding, and the tied decoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from sctd_dist.model.arch import HF_TIED, ModelConfig, arch_of, hf_class
from sctd_dist.parallel import layout


def hf_to_shard(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, tp_size: int, tp_rank: int
) -> dict[str, torch.Tensor]:
    """This TP rank's slice of a transformers masked-LM state dict, under our parameter names."""
    out: dict[str, torch.Tensor] = {}
    padded = cfg.padded_vocab_size(tp_size)
    tied = HF_TIED[arch_of(cfg)]
    for name, tensor in hf_state.items():
        if name in tied or name.endswith("position_ids"):
            continue
        out[name] = layout.split(tensor.detach().cpu(), name, tp_size, tp_rank, padded).clone()
    return out


def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a transformers masked-LM state dict into our model at its TP size and rank."""
    ctx = model.ctx
    shard = hf_to_shard(hf_state, model.config, ctx.tp_size, ctx.tp_rank)
    own = model.state_dict()
    missing = sorted(set(own) - set(shard))
    unexpected = sorted(set(shard) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, t in shard.items():
        if own[name].shape != t.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(own[name].shape)}")
    model.load_state_dict(shard, strict=False)


def merge_shards(
    shards: Iterable[Mapping[str, torch.Tensor]], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Rank-ordered TP shards of our model -> a transformers masked-LM state dict (vocab unpadded)."""
    shards = list(shards)
    merged: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        parts = [s[name].detach().cpu() for s in shards]
        merged[name] = layout.merge(parts, name, cfg.vocab_size).clone()
    for tie, source in HF_TIED[arch_of(cfg)].items():
        merged[tie] = merged[source]
    return merged


def gather_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """All TP ranks call this; TP rank 0 receives the merged transformers state dict."""
    import torch.distributed as dist

    ctx = model.ctx
    local = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ctx.tp_size == 1:
        return merge_shards([local], model.config)
    shards: list | None = [None] * ctx.tp_size if ctx.tp_rank == 0 else None
    dist.gather_object(local, shards, dst=dist.get_global_rank(ctx.tp_group, 0), group=ctx.tp_group)
    return merge_shards(shards, model.config) if ctx.tp_rank == 0 else None


def to_hf_model(state: Mapping[str, torch.Tensor], cfg: ModelConfig):
    """A transformers masked-LM model of `cfg`'s architecture holding `state` (fp32)."""
    hf = hf_class(cfg)(cfg.to_hf_config())
    hf.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    hf.tie_weights()
    return hf


def save_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
            tokenizer=None) -> Path:
    """Write a folder that transformers' `BertForMaskedLM` / `ModernBertForMaskedLM`
    `from_pretrained` loads with no custom code."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_hf_model(state, cfg).save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
