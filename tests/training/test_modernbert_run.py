"""ModernBERT through the real entry point (torchrun, 2 CPU ranks, fp32, ScTD token dropping,
attention within documents): started from a transformers ModernBertForMaskedLM folder with
`--init-hf` (no --arch, no --model), killed with SIGKILL and restarted, resumed at another
layout, and exported back to a stock ModernBertForMaskedLM folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from sctd_dist import checkpoint
from tests.conftest import SEQ
from tests.training import launch
from tests.training.test_restart import job_args

STEPS = 12


@pytest.fixture(scope="module")
def start_folder(tmp_path_factory, data_dir):
    """A randomly initialised tiny ModernBertForMaskedLM with the sample data's vocabulary."""
    from transformers import ModernBertForMaskedLM

    from sctd_dist.data.dataset import PackedDataset
    from sctd_dist.model.modernbert_config import ModernBertModelConfig

    data = PackedDataset(data_dir, split="train")
    s = data.special_ids
    cfg = ModernBertModelConfig.from_preset("tiny", vocab_size=data.vocab_size, local_attention=16,
                                            pad_token_id=s.pad, cls_token_id=s.cls, sep_token_id=s.sep)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("modernbert-start")
    ModernBertForMaskedLM(cfg.to_hf_config()).save_pretrained(folder)
    return folder


def _args(tmp, data_dir, start_folder, name, layout):
    # TP=2 without sequence parallelism: it routes exactly as TP=1 does, so the TP=1 x DP=2
    # resume can follow the same curve.
    args = job_args(tmp, data_dir, 2, "tp1dp2", name, "--init-hf", str(start_folder), "--save-interval", "6")
    return args + ["--tensor-model-parallel-size", "2"] if layout == "tp2" else args


def test_modernbert_restart_resume_and_export(tmp_path, data_dir, start_folder):
    straight = _args(tmp_path, data_dir, start_folder, "straight", "tp2")
    proc = launch.train(2, *straight)
    ref = launch.losses(tmp_path / "straight" / "logs")
    assert sorted(ref) == list(range(STEPS)) and all(0 < v < 20 for v in ref.values())
    start = launch.events(tmp_path / "straight" / "logs", "start")[0]
    assert start["tp_size"] == 2

    # SIGKILL after the step-6 checkpoint, then the same command: the uninterrupted curve, exactly.
    killed = _args(tmp_path, data_dir, start_folder, "killed", "tp2")
    launch.kill_after_checkpoint(2, tmp_path / "killed" / "ckpt", "global_step6", *killed)
    launch.train(2, *killed)
    assert launch.losses(tmp_path / "killed" / "logs") == ref

    # The TP=2 x DP=1 checkpoint of step 6 resumed at TP=1 x DP=2 (no dropout in the tiny
    # ModernBERT: only the reduction order differs).
    moved = tmp_path / "moved" / "ckpt"
    shutil.copytree(tmp_path / "straight" / "ckpt" / "global_step6", moved / "global_step6")
    (moved / checkpoint.LATEST).write_text("global_step6")
    launch.train(2, *_args(tmp_path, data_dir, start_folder, "moved", "tp1"))
    got = launch.losses(tmp_path / "moved" / "logs")
    assert launch.events(tmp_path / "moved" / "logs", "layout_change")
    assert sorted(got) == list(range(6, STEPS))
    for s in got:
        assert abs(got[s] - ref[s]) < 1e-4 * abs(ref[s]), (s, got[s], ref[s])

    _export_loads_in_transformers(tmp_path)


def _export_loads_in_transformers(tmp_path):
    from transformers import ModernBertForMaskedLM

    from sctd_dist.export import export

    out = export(tmp_path / "straight" / "ckpt", tmp_path / "exported")
    model, info = ModernBertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor([[model.config.cls_token_id] + list(range(10, 10 + SEQ - 2)) + [model.config.sep_token_id]])
    assert torch.isfinite(model.eval()(input_ids=ids).logits).all()
