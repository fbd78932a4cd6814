"""Checkpoint bookkeeping: the `latest` pointer, pruning and compatibility messages."""

from __future__ import annotations

import json

import pytest

from sctd_dist import checkpoint
from sctd_dist.coordination import atomic_write


def _fake_checkpoint(root, step, complete=True):
    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (folder / checkpoint.RUN_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_latest_is_none_without_pointer(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    assert checkpoint.latest_tag(None) is None


def test_pointer_to_incomplete_checkpoint_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 4, complete=False)
    (tmp_path / checkpoint.LATEST).write_text("global_step4")
    with pytest.raises(RuntimeError, match="incomplete"):
        checkpoint.latest_tag(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "latest"
    atomic_write(path, "global_step1")
    atomic_write(path, "global_step2")
    assert path.read_text() == "global_step2"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left


def test_prune_keeps_newest_and_the_pointed_one(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    half = _fake_checkpoint(tmp_path, 10, complete=False)  # a save that was killed
    (tmp_path / checkpoint.LATEST).write_text("global_step8")
    removed = checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["global_step2", "global_step4"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "global_step10", "global_step6", "global_step8"]
    assert half.exists()


def test_incompatible_checkpoint_names_each_difference():
    saved = {"model": {"hidden_size": 128, "num_hidden_layers": 4}, "tensor_model_parallel_size": 2}
    now = {"model": {"hidden_size": 256, "num_hidden_layers": 4}, "tensor_model_parallel_size": 1}
    with pytest.raises(ValueError) as err:
        checkpoint.check_compatible(saved, now)
    msg = str(err.value)
    assert "hidden_size: checkpoint 128, now 256" in msg
    assert "--tensor-model-parallel-size: checkpoint 2, now 1" in msg
    assert "num_hidden_layers" not in msg
    checkpoint.check_compatible(saved, dict(saved))
