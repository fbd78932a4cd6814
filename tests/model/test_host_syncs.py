"""A training step on the loader's batches asks the device nothing on the way (no host sync in
forward, backward or the importance update), and runs attention without a mask when no row
holds padding. Watched with a TorchFunctionMode that sees every torch call the step makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sctd_dist.data.loader import _to_batch
from sctd_dist.model.config import TokenDropConfig
from sctd_dist.model.pretraining import PretrainingModel
from tests.model.common import SPECIAL, make_batch, small_config
from tests.model.test_pretraining import SPECIALS

# Calls whose result the host must wait for (their value, or a size that depends on values).
SYNCING = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
           torch.Tensor.__float__, torch.nonzero, torch.Tensor.nonzero, torch.unique,
           torch.unique_consecutive, torch.masked_select, torch.Tensor.masked_select}


class StepWatch(TorchFunctionMode):
    """Records host-syncing calls (except on the given host-side tensors) and the attention
    masks `scaled_dot_product_attention` receives."""

    def __init__(self, host: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.host = host
        self.syncs: list[str] = []
        self.masks: list[torch.Tensor | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_host = bool(args) and any(args[0] is t for t in self.host)
        if func in SYNCING and not on_host:
            self.syncs.append(func.__name__)
        if func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            self.syncs.append("boolean indexing")
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


def _loader_batch(padded: bool) -> dict[str, torch.Tensor]:
    """A micro-batch assembled by the loader's own `_to_batch` from masked rows."""
    b = make_batch(batch=3, seq=16)
    ids, labels = b["input_ids"].numpy().copy(), b["labels"].numpy()
    if not padded:  # packed rows: every position holds text
        ids[ids == SPECIAL["pad"]] = 7
    return _to_batch(ids, labels, SPECIAL["pad"], SPECIAL["sep"])


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_step_has_no_host_sync_and_no_mask_without_padding(ctx1, padded):
    cfg = small_config()
    model = PretrainingModel(cfg, TokenDropConfig(mode="sctd"), SPECIALS, ctx1).train()
    batch = _loader_batch(padded)
    assert bool(batch["padded"]) == padded
    reference = model.mlm(batch["input_ids"], batch["attention_mask"], batch["labels"],
                          routing=model.routing(batch["input_ids"], batch["attention_mask"]),
                          split_layer=model.split_layer).loss  # flags computed by the model
    watch = StepWatch(host=(batch["padded"],))
    with watch:  # each step's forward also folds its losses into the importance table
        outs = [model(batch, step=step) for step in (0, 1)]  # a consistency step, a plain one
        for out in outs:
            out.loss.backward()
    assert watch.syncs == []
    assert len(watch.masks) == 3 * cfg.num_hidden_layers
    assert all((m is not None) == padded for m in watch.masks)
    # The loader's masked positions select what the model's own search selects.
    torch.testing.assert_close(outs[0].metrics["mlm_loss"], reference.detach())
    assert torch.isfinite(model.importance.scores).all()
