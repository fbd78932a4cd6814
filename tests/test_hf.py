"""Hugging Face interop: imported weights compute what transformers computes; export round-trips."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks
from tests.model.common import VOCAB, captured_logits, hf_reference_state, make_batch, small_config

CFG = small_config(num_attention_heads=2)
STATE = hf_reference_state(CFG, seed=3)
BATCH = make_batch(batch=4, seq=24, seed=5)


def import_and_export(rank: int, world: int, cfg, state, batch):
    import torch.distributed as dist

    from sctd_dist.hf import gather_hf_state_dict, load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.parallel import initialize

    ctx = initialize(world)
    model = BertForMaskedLM(cfg, ctx).eval()
    load_hf_state_dict(model, state)
    with torch.no_grad(), captured_logits(model) as seen:
        out = model(**batch)
    parts = [torch.empty_like(seen[0]) for _ in range(world)]
    dist.all_gather(parts, seen[0], group=ctx.tp_group)
    return {"logits": torch.cat(parts, dim=1)[:, :VOCAB], "loss": out.loss,
            "exported": gather_hf_state_dict(model)}


@pytest.fixture(scope="module")
def hf_outputs():
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(CFG.to_hf_config()).eval()
    model.load_state_dict(STATE)
    with torch.no_grad():
        out = model(**BATCH)
    selected = BATCH["labels"] >= 0
    return out.logits[selected], out.loss


@pytest.mark.parametrize("tp", [1, 2])
def test_import_matches_transformers_and_export_round_trips(hf_outputs, tp):
    ref_logits, ref_loss = hf_outputs
    results = run_ranks(import_and_export, tp, CFG, STATE, BATCH)
    assert BATCH["attention_mask"].min() == 0  # the batch really is padded
    for r in results:
        assert (r["logits"] - ref_logits).abs().max() <= 1e-5
        torch.testing.assert_close(r["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    exported = results[0]["exported"]
    assert set(exported) == set(STATE) - {k for k in STATE if k.endswith("position_ids")}
    for name, t in STATE.items():
        assert torch.equal(exported[name], t), name


def test_exported_folder_loads_in_transformers(tmp_path):
    from transformers import BertForMaskedLM

    from sctd_dist.hf import save_hf

    save_hf(STATE, CFG, tmp_path)
    loaded = BertForMaskedLM.from_pretrained(tmp_path)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, STATE[name]), name

