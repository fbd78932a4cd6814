"""The run record: typed fields, every one validated, old records read, and the comparison a
resume plans with (what refuses a checkpoint, what is a logged change, what is a data switch)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sctd_dist import checkpoint, reshard
from sctd_dist.run_record import VERSION, RunRecord, RunRecordError, read, write


def _record(**changes) -> RunRecord:
    fields = {"model": {"hidden_size": 128}, "tensor_model_parallel_size": 1, "world_size": 1, "dp_size": 1,
              "zero_stage": 1, "global_batch_size": 8, "token_drop": {"mode": "sctd", "keep_ratio": 0.5},
              "tokenizer_fingerprint": "abc"}
    return RunRecord(**{**fields, **changes})


def test_round_trip_keeps_every_field_and_the_version(tmp_path):
    record = _record(step=6, train_config={"seed": 1234, "lr": None}, files={"a.pt": [3, 99]},
                     deepspeed_config={"train_batch_size": 8, "zero_optimization": {"stage": 1}})
    write(tmp_path / "sctd_run.json", record)
    assert read(tmp_path / "sctd_run.json") == record
    assert json.loads((tmp_path / "sctd_run.json").read_text())["version"] == VERSION


def test_version_1_plain_dict_records_still_read(tmp_path):
    old = {"step": 4, "model": {"hidden_size": 128}, "tensor_model_parallel_size": 2, "world_size": 2,
           "zero_stage": 1, "seq_length": 64}
    (tmp_path / "sctd_run.json").write_text(json.dumps(old))
    record = read(tmp_path / "sctd_run.json")
    assert record.version == 1 and record.dp_size == 1 and record.step == 4 and record.seq_length == 64
    assert record.deepspeed_config is None and record.tokenizer_fingerprint is None


@pytest.mark.parametrize("change, needle", [
    ({"zero_stage": 5}, "'zero_stage' must be 0..3"),
    ({"step": -1}, "'step' must be >= 0"),
    ({"dp_size": 0}, "'dp_size' must be >= 1"),
    ({"dp_size": 2}, "world_size 1 is not tensor_model_parallel_size 1 x dp_size 2"),
    ({"global_batch_size": "8"}, "'global_batch_size' must be an integer"),
    ({"model": [1]}, "'model' must be an object"),
    ({"train_config": "seed=1"}, "'train_config' must be an object"),
    ({"files": {"a.pt": [1]}}, "files['a.pt'] must be [size, crc32]"),
])
def test_every_field_is_validated(change, needle):
    with pytest.raises(RunRecordError) as err:
        RunRecord.from_dict({**_record().to_dict(), **change})
    assert needle in str(err.value)


def test_missing_unknown_and_newer_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "sctd_run.json"
    for data, needle in (({"step": 3}, "not a run record (no dp_size, model, tensor_model_parallel_size"),
                         ({**_record().to_dict(), "colour": 1}, "unknown fields ['colour']"),
                         ({**_record().to_dict(), "version": VERSION + 1}, "is newer than this sctd-dist's"),
                         ([1, 2], "is a JSON object")):
        path.write_text(json.dumps(data))
        with pytest.raises(RunRecordError, match=r"sctd_run\.json") as err:
            read(path)
        assert needle in str(err.value)


def test_adding_a_field_is_one_declaration():
    @dataclasses.dataclass(frozen=True)
    class Extended(RunRecord):
        mixture: dict | None = None

    old = _record().to_dict()
    assert Extended.from_dict(old).mixture is None  # older records read with the default
    assert Extended.from_dict({**old, "mixture": {"wiki": 1.0}}).to_dict()["mixture"] == {"wiki": 1.0}


def test_incompatible_checkpoint_names_each_difference():
    saved = _record(model={"hidden_size": 128, "num_hidden_layers": 4}, tensor_model_parallel_size=2,
                    world_size=2)
    now = _record(model={"hidden_size": 256, "num_hidden_layers": 4})
    with pytest.raises(ValueError) as err:
        checkpoint.check_compatible(saved, now)
    msg = str(err.value)
    assert "hidden_size: checkpoint 128, now 256" in msg
    assert "tensor" not in msg  # another TP size is resharded, not refused
    assert "num_hidden_layers" not in msg
    checkpoint.check_compatible(saved, saved)


@pytest.mark.parametrize("now, changes", [
    ({"data_path": "/data/phase1/../phase1", "seq_length": 128}, {}),  # the same folder
    ({"data_path": "/data/phase2", "seq_length": 128}, {"--data-path": ["/data/phase1", "/data/phase2"]}),
    ({"data_path": "/data/phase1", "seq_length": 512}, {"--seq-length": [128, 512]}),
])
def test_data_switch_names_what_changed(now, changes):
    saved = _record(data_path="/data/phase1", seq_length=128)
    assert saved.data_switch(_record(**now)) == changes


@pytest.mark.parametrize("saved_stage, stage, refused", [(1, 2, False), (2, 1, False), (3, 3, False),
                                                         (0, 1, True), (2, 3, True), (3, 0, True)])
def test_layout_change_across_zero_families_is_refused_in_one_line(saved_stage, stage, refused):
    saved = _record(tensor_model_parallel_size=2, world_size=2, dp_size=1, zero_stage=saved_stage)
    now = _record(tensor_model_parallel_size=1, world_size=2, dp_size=2, zero_stage=stage)
    assert saved.layout_changed(now)
    if not refused:
        reshard.check_supported(saved, now)
        return
    with pytest.raises(ValueError, match=f"ZeRO stage {saved_stage} and this run uses stage {stage}") as err:
        reshard.check_supported(saved, now)
    assert "\n" not in str(err.value) and "--deepspeed_config" in str(err.value)


def test_another_tokenizer_is_refused():
    with pytest.raises(ValueError, match="the --data-path tokenizer: checkpoint fingerprint abc, now xyz"):
        checkpoint.check_compatible(_record(), _record(tokenizer_fingerprint="xyz"))
    old = _record(tokenizer_fingerprint=None)  # a checkpoint from before fingerprints were recorded
    assert old.compare(_record(tokenizer_fingerprint="xyz")) == ([], [])


def test_same_data_with_other_rows_or_seed_is_refused_other_data_is_not():
    saved = _record(data_path="/data/a", num_samples=100, train_config={"seed": 5})
    with pytest.raises(ValueError, match="--seed 5"):
        checkpoint.check_compatible(saved, _record(data_path="/data/a", num_samples=100, train_config={"seed": 6}))
    with pytest.raises(ValueError, match="same --data-path"):
        checkpoint.check_compatible(saved, _record(data_path="/data/a", num_samples=101, train_config={"seed": 5}))
    # a new phase on other data: its own rows and seed
    assert checkpoint.check_compatible(saved, _record(data_path="/data/b", num_samples=7,
                                                      train_config={"seed": 6})) == []


def test_token_dropping_and_batch_changes_are_events():
    now = _record(global_batch_size=16, token_drop={"mode": "none", "keep_ratio": 0.5})
    refusals, events = _record().compare(now)
    assert refusals == []
    assert events == [
        {"event": "token_drop_change", "checkpoint": {"mode": "sctd", "keep_ratio": 0.5},
         "now": {"mode": "none", "keep_ratio": 0.5}},
        {"event": "global_batch_change", "checkpoint": 8, "now": 16}]
    assert checkpoint.check_compatible(_record(), _record()) == []
