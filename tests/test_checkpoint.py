"""Checkpoint bookkeeping: the `latest` pointer, pruning and compatibility messages."""

from __future__ import annotations

import json

import pytest

from sctd_dist import checkpoint, reshard
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
    assert "tensor" not in msg  # another TP size is resharded, not refused
    assert "num_hidden_layers" not in msg
    checkpoint.check_compatible(saved, dict(saved))


@pytest.mark.parametrize("now, changes", [
    ({"data_path": "/data/phase1/../phase1", "seq_length": 128}, {}),  # the same folder
    ({"data_path": "/data/phase2", "seq_length": 128}, {"--data-path": ["/data/phase1", "/data/phase2"]}),
    ({"data_path": "/data/phase1", "seq_length": 512}, {"--seq-length": [128, 512]}),
])
def test_data_switch_names_what_changed(now, changes):
    saved = {"data_path": "/data/phase1", "seq_length": 128}
    assert checkpoint.data_switch(saved, now) == changes


@pytest.mark.parametrize("saved_stage, stage, refused", [(1, 2, False), (2, 1, False), (3, 3, False),
                                                         (0, 1, True), (2, 3, True), (3, 0, True)])
def test_layout_change_across_zero_families_is_refused_in_one_line(saved_stage, stage, refused):
    saved = {"tensor_model_parallel_size": 2, "dp_size": 1, "zero_stage": saved_stage}
    now = {"tensor_model_parallel_size": 1, "dp_size": 2, "zero_stage": stage}
    assert reshard.layout_changed(saved, now)
    if not refused:
        reshard.check_supported(saved, now)
        return
    with pytest.raises(ValueError, match=f"ZeRO stage {saved_stage} and this run uses stage {stage}") as err:
        reshard.check_supported(saved, now)
    assert "\n" not in str(err.value) and "--deepspeed_config" in str(err.value)
