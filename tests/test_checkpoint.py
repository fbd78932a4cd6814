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
