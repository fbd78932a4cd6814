"""An encoder weight that would not load stops fine-tuning with its name, before training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sctd_dist.finetune.cli import main
from sctd_dist.finetune.weights import ModelSource, checkpoint_state_dict, load_task_model, verify_loaded

QUERY = "bert.encoder.layer.1.attention.self.query.weight"


def _edited_copy(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _finetune_error(capsys, model: Path, tmp_path: Path) -> str:
    out = tmp_path / "out"
    code = main(["--model", str(model), "--task", "stdlib-topic", "--out", str(out), "--no-progress",
                 "--max-train-samples", "8", "--max-eval-samples", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err
    assert not (out / "results.json").exists()
    return err


def test_renamed_encoder_weight_is_named(capsys, exported_model, tmp_path):
    renamed = QUERY.replace("query", "querry")
    model = _edited_copy(exported_model, tmp_path / "renamed",
                         lambda s: s.__setitem__(renamed, s.pop(QUERY)))
    err = _finetune_error(capsys, model, tmp_path)
    assert f"encoder weight(s) not in the checkpoint: {QUERY}" in err
    assert f"does not use (renamed?): {renamed}" in err


def test_missing_encoder_weight_is_named(capsys, exported_model, tmp_path):
    name = "bert.encoder.layer.3.output.LayerNorm.bias"
    model = _edited_copy(exported_model, tmp_path / "missing", lambda s: s.pop(name))
    err = _finetune_error(capsys, model, tmp_path)
    assert f"not in the checkpoint: {name}" in err and "random values" in err


@pytest.mark.parametrize("kind", ["classification", "qa"])
def test_weights_that_loaded_pass_and_tampering_is_caught(exported_model, kind):
    source = ModelSource(exported_model, exported_model)
    model, fresh = load_task_model(source, kind, 3)
    assert all(k.startswith(("classifier.", "qa_outputs.", "bert.pooler.")) for k in fresh)
    stored = checkpoint_state_dict(exported_model)
    # A bare BertModel's keys (no "bert." prefix) and legacy LayerNorm names are still recognised.
    bare = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in stored.items()}
    assert verify_loaded(model, bare, exported_model) == fresh
    with torch.no_grad():
        model.state_dict()[QUERY].add_(1.0)  # loaded, then changed: not what the checkpoint holds
    with pytest.raises(ValueError, match=f"did not load as stored .*{QUERY}"):
        verify_loaded(model, stored, exported_model)
