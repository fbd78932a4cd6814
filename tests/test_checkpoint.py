"""Checkpoint bookkeeping: the `latest` pointer, pruning and compatibility messages."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

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


def test_pointer_to_incomplete_checkpoint_without_others_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 4, complete=False)
    (tmp_path / checkpoint.LATEST).write_text("global_step4")
    with pytest.raises(checkpoint.CheckpointError, match="names global_step4, which is not a complete "
                       "checkpoint and .* holds no complete checkpoint"):
        checkpoint.latest_tag(tmp_path)


@pytest.mark.parametrize("pointer", [None, "", "  \n", "global_step12", "global_step9"])
def test_missing_empty_or_dangling_pointer_takes_the_newest_complete_checkpoint(tmp_path, pointer):
    for step in (3, 6):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 9, complete=False)  # a save that was killed
    if pointer is not None:
        (tmp_path / checkpoint.LATEST).write_text(pointer)
    tags, warnings = checkpoint.resume_candidates(tmp_path)
    assert tags == ["global_step6", "global_step3"]
    assert len(warnings) == 1 and "resuming from the newest complete checkpoint, global_step6" in warnings[0]


def test_pointer_names_the_checkpoint_and_older_ones_are_fallbacks(tmp_path):
    for step in (3, 6, 9):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / checkpoint.LATEST).write_text("global_step6")  # rolled back on purpose
    assert checkpoint.resume_candidates(tmp_path) == (["global_step6", "global_step3"], [])


@pytest.mark.parametrize("text", ["/tmp/elsewhere", "../other/global_step3", "global_step3/..", "step3"])
def test_pointer_outside_the_folder_is_refused(tmp_path, text):
    _fake_checkpoint(tmp_path, 3)
    (tmp_path / checkpoint.LATEST).write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint tag"):
        checkpoint.resume_candidates(tmp_path)


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
    # a blend: compared as weighted resolved folders
    ({"data_path": "/data/phase1", "data_mixture": [[0.75, "/data/phase1"], [0.25, "/data/books"]],
      "seq_length": 128}, {"--data-path": ["/data/phase1", "0.75 /data/phase1 0.25 /data/books"]}),
])
def test_data_switch_names_what_changed(now, changes):
    saved = {"data_path": "/data/phase1", "seq_length": 128}
    assert checkpoint.data_switch(saved, now) == changes


def test_a_changed_blend_is_a_data_switch():
    blend = {"data_path": "/d/a", "data_mixture": [[0.75, "/d/a"], [0.25, "/d/b"]], "seq_length": 128}
    assert checkpoint.data_switch(blend, dict(blend)) == {}
    reweighted = {**blend, "data_mixture": [[0.5, "/d/a"], [0.5, "/d/b"]]}
    assert checkpoint.data_switch(blend, reweighted) == {"--data-path": ["0.75 /d/a 0.25 /d/b", "0.5 /d/a 0.5 /d/b"]}


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


class _Planted:
    """Unpickling this would create `marker`: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_rng_state_round_trips_as_data_only(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "rng_rank0.pt"
    streams = checkpoint.RNGStreams()
    torch.save(streams.state_dict(), path)
    draw = lambda: (random.random(), float(np.random.rand()), torch.rand(1).item())  # noqa: E731
    first = draw()
    streams.load_state_dict(checkpoint.load_state_file(path))
    assert draw() == first


def test_crafted_rng_file_is_refused_not_executed(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "rng_rank0.pt"
    torch.save({"python": _Planted(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt holds objects that are not "
                       "checkpoint data"):
        checkpoint.load_state_file(path)
    assert not marker.exists()


def _record(**changes):
    record = {"model": {"hidden_size": 128}, "tensor_model_parallel_size": 1, "global_batch_size": 8,
              "token_drop": {"mode": "sctd", "keep_ratio": 0.5}, "tokenizer_fingerprint": "abc"}
    return {**record, **changes}


def test_another_tokenizer_is_refused():
    with pytest.raises(ValueError, match="the --data-path tokenizer: checkpoint fingerprint abc, now xyz"):
        checkpoint.check_compatible(_record(), _record(tokenizer_fingerprint="xyz"))
    old = _record()
    del old["tokenizer_fingerprint"]  # a checkpoint from before fingerprints were recorded
    assert checkpoint.compare_records(old, _record(tokenizer_fingerprint="xyz")) == ([], [])


def test_token_dropping_and_batch_changes_are_events():
    now = _record(global_batch_size=16, token_drop={"mode": "none", "keep_ratio": 0.5})
    refusals, events = checkpoint.compare_records(_record(), now)
    assert refusals == []
    assert events == [
        {"event": "token_drop_change", "checkpoint": {"mode": "sctd", "keep_ratio": 0.5},
         "now": {"mode": "none", "keep_ratio": 0.5}},
        {"event": "global_batch_change", "checkpoint": 8, "now": 16}]
    assert checkpoint.check_compatible(_record(), _record()) == []
