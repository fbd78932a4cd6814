"""ModernBERT to and from transformers: `--init-hf` of a ModernBertForMaskedLM folder takes the
architecture and shape from its config.json, the weights export back unchanged (no missing or
unexpected weights, the same logits), another model type is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.common import VOCAB
from tests.model.modern_common import hf_modern_state, hf_model, modern_config, packed_batch

CFG = modern_config()
STATE = hf_modern_state(CFG, seed=7)
BATCH = packed_batch(seed=1)


@pytest.fixture(scope="module")
def ctx1():
    from sctd_dist.parallel import initialize

    return initialize(1)


def test_init_hf_then_export_round_trips(tmp_path, ctx1):
    from transformers import ModernBertForMaskedLM

    from sctd_dist.hf import gather_hf_state_dict, save_hf
    from sctd_dist.model.arch import run_model_config
    from sctd_dist.model.config import TokenDropConfig
    from sctd_dist.model.pretraining import PretrainingModel
    from sctd_dist.run import _load_hf_weights
    from sctd_dist.special_tokens import SpecialTokenIds

    source = tmp_path / "source"
    hf_model(CFG, STATE).save_pretrained(source)
    # No --arch and a BERT preset named: the folder decides architecture and shape.
    cfg = run_model_config("bert", "base", None, source, False, VOCAB)
    assert cfg.to_dict() == CFG.to_dict()
    special = SpecialTokenIds(cls=2, sep=3, mask=4, pad=0, unk=1)
    model = PretrainingModel(cfg, TokenDropConfig(mode="none"), special, ctx1).eval()
    _load_hf_weights(model, source)
    out = save_hf(gather_hf_state_dict(model.mlm), cfg, tmp_path / "exported")
    loaded, info = ModernBertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "modernbert"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = {k: BATCH[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = hf_model(CFG, STATE)(**inputs).logits
        after = loaded.eval()(**inputs).logits
    assert (after - before).abs().max() <= 1e-5
    # sctd_dist.finetune loads it (transformers' Auto classes), every encoder weight checked.
    from sctd_dist.finetune.weights import ModelSource, load_task_model

    for kind in ("classification", "qa"):
        task, fresh = load_task_model(ModelSource(out, out), kind, 3)
        assert all(not k.startswith("model.") for k in fresh), fresh
        assert torch.equal(task.model.layers[1].attn.Wqkv.weight, STATE["model.layers.1.attn.Wqkv.weight"])


def test_init_hf_of_another_model_type_is_refused_in_one_line(tmp_path):
    """Checked with the other paths at the start of the run, before any work."""
    from sctd_dist.arguments import parse_args
    from sctd_dist.run import check_paths

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 10}))
    with pytest.raises(ValueError) as refused:
        check_paths(parse_args(["--init-hf", str(tmp_path)]))
    message = str(refused.value)
    assert "'roberta'" in message and str(tmp_path) in message and "\n" not in message
    hf_model(CFG, STATE).save_pretrained(tmp_path / "modern")
    with pytest.raises(ValueError, match="--arch modernbert"):
        check_paths(parse_args(["--init-hf", str(tmp_path / "modern"), "--arch", "bert"]))
