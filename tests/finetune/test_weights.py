"""An encoder weight that would not load stops fine-tuning with its name, before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sctd_dist.finetune.cli import main
from sctd_dist.finetune.weights import ModelSource, checkpoint_state_dict, load_task_model, verify_loaded

QUERY = "bert.encoder.layer.1.attention.self.query.weight"
TYPES = "bert.embeddings.token_type_embeddings.weight"


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


def _with_pretraining_heads(exported_model: Path, dest: Path) -> Path:
    """The export as a BertForPreTraining checkpoint of older transformers writes it: a pooler, the
    next-sentence head and the non-persistent buffers stored as tensors."""
    def edit(state):
        hidden = state["bert.embeddings.word_embeddings.weight"].shape[1]
        generator = torch.Generator().manual_seed(0)
        state["bert.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=generator)
        state["bert.pooler.dense.bias"] = torch.randn(hidden, generator=generator)
        state["cls.seq_relationship.weight"] = torch.randn(2, hidden, generator=generator)
        state["cls.seq_relationship.bias"] = torch.zeros(2)
        positions = state["bert.embeddings.position_embeddings.weight"].shape[0]
        state["bert.embeddings.position_ids"] = torch.arange(positions)[None]
        state["bert.embeddings.token_type_ids"] = torch.zeros(1, positions, dtype=torch.long)

    return _edited_copy(exported_model, dest, edit)


def test_qa_loads_every_encoder_weight_of_a_checkpoint_with_a_pooler(exported_model, tmp_path):
    model_dir = _with_pretraining_heads(exported_model, tmp_path / "pretraining")
    stored = checkpoint_state_dict(model_dir)
    qa, fresh = load_task_model(ModelSource(model_dir, model_dir), "qa", 2)
    assert fresh == ["qa_outputs.bias", "qa_outputs.weight"]
    encoder = {k: v for k, v in qa.state_dict().items() if k.startswith("bert.")}
    assert len(encoder) > 20 and all(torch.equal(v, stored[k]) for k, v in encoder.items())
    # The classifier uses the pooler: it loads as stored instead of starting fresh.
    cls, fresh = load_task_model(ModelSource(model_dir, model_dir), "classification", 2)
    assert fresh == ["classifier.bias", "classifier.weight"]
    assert torch.equal(cls.state_dict()["bert.pooler.dense.weight"], stored["bert.pooler.dense.weight"])


def test_segment_b_starts_from_segment_a_when_pretraining_never_trained_it(exported_model, tmp_path):
    from sctd_dist.finetune.segments import decide

    stored = checkpoint_state_dict(exported_model)
    # Our export carries the run record: pretraining fed segment A only.
    auto = decide(exported_model, stored, "auto")
    assert auto.trained is False and auto.copy and "sctd_run.json" in auto.decided_by
    assert decide(exported_model, stored, "keep").copy is False
    model, _ = load_task_model(ModelSource(exported_model, exported_model), "classification", 2, copy_segment_b=True)
    table = model.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(table[1], table[0]) and torch.equal(table[0], stored[TYPES][0])
    # Without a run record, the weights decide: row 1 as initialised, or trained away from it.
    foreign = shutil.copytree(exported_model, tmp_path / "foreign")
    (foreign / "sctd_run.json").unlink()
    untouched = decide(foreign, stored, "auto")
    assert untouched.copy and "is still at its initialisation" in untouched.decided_by
    trained = dict(stored)
    trained[TYPES] = stored[TYPES].clone()
    trained[TYPES][1] = trained[TYPES][1] * 3 + 0.05
    assert decide(foreign, trained, "auto").copy is False
    # A recorded answer wins over detection.
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "segment_b_trained": True}))
    recorded = decide(foreign, stored, "auto")
    assert recorded.trained and not recorded.copy and "config.json" in recorded.decided_by
