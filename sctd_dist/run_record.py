"""The run record: what a checkpoint says about the run that wrote it (`sctd_run.json`).

One typed, versioned dataclass, written (`write`) and read (`read`, `from_dict`) here only. It
keeps the model's shapes, the layout, the data, the resolved flags and the whole resolved
DeepSpeed config, plus what the save adds (the step, the checksums of the other files). A
restart compares the checkpoint's record with this run's (`compare`, `data_switch`,
`layout_changed`) to decide what it may load and what it changes.

Adding a field: declare it below with a default (None: "not recorded"); records written before
it existed read with that default, and the comparisons skip a value either side lacks. Version
1 records (plain dicts, before this class) still read: their missing fields take the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sctd_dist.coordination import atomic_write
from sctd_dist.typed import type_problem

VERSION = 2
FILE = "sctd_run.json"
# Model config fields that fix parameter shapes: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size")
_POSITIVE = ("tensor_model_parallel_size", "world_size", "dp_size", "global_batch_size", "seq_length",
             "num_samples")


class RunRecordError(ValueError):
    """A run record that is missing, malformed or from a newer sctd-dist."""


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint records about its run (see the module docstring)."""

    model: dict[str, Any]  # BertModelConfig.to_dict()
    tensor_model_parallel_size: int
    world_size: int
    dp_size: int
    zero_stage: int
    step: int = 0  # optimizer steps done; set at save
    sequence_parallel: bool | None = None
    global_batch_size: int | None = None
    seq_length: int | None = None
    token_drop: dict[str, Any] | None = None  # TokenDropConfig fields
    data_path: str | None = None  # resolved training data folder
    num_samples: int | None = None  # rows of its training split
    tokenizer_fingerprint: str | None = None
    train_config: dict[str, Any] | None = None  # the resolved flags
    deepspeed_config: dict[str, Any] | None = None  # the resolved DeepSpeed config
    files: dict[str, list[int]] | None = None  # [size, CRC-32] of every other file; set at save
    version: int = VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RunRecordError naming the first field whose value is wrong."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            wanted = "an object" if _is_dict(kind) else type_problem(value, kind)
            if _is_dict(kind) and (isinstance(value, dict) or value is None and f.default is None):
                wanted = None
            if wanted:
                raise RunRecordError(f"run record field {f.name!r} must be {wanted}, got {value!r}")
        for name in _POSITIVE:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RunRecordError(f"run record field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise RunRecordError(f"run record field 'zero_stage' must be 0..3, got {self.zero_stage}")
        if self.step < 0:
            raise RunRecordError(f"run record field 'step' must be >= 0, got {self.step}")
        if self.world_size != self.tensor_model_parallel_size * self.dp_size:
            raise RunRecordError(f"run record: world_size {self.world_size} is not tensor_model_parallel_size "
                                 f"{self.tensor_model_parallel_size} x dp_size {self.dp_size}")
        for name, entry in (self.files or {}).items():
            if not (isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry)):
                raise RunRecordError(f"run record: files[{name!r}] must be [size, crc32], got {entry!r}")

    def with_step(self, step: int, files: dict[str, list[int]] | None = None) -> RunRecord:
        """This record as a save of step `step` writes it."""
        return dataclasses.replace(self, step=step, files=files)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (what `from_dict` reads back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        """A record from `to_dict()` output, or from a version 1 record (a plain dict)."""
        if not isinstance(data, dict):
            raise RunRecordError(f"a run record is a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.setdefault("version", 1)
        if type(version) is not int or version > VERSION:
            raise RunRecordError(f"run record version {version!r} is newer than this sctd-dist's "
                                 f"({VERSION}); resume with the sctd-dist that wrote it")
        if version == 1 and "dp_size" not in data and _all_int(data, "world_size", "tensor_model_parallel_size"):
            data["dp_size"] = data["world_size"] // data["tensor_model_parallel_size"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RunRecordError(f"run record holds unknown fields {unknown} (written by a newer sctd-dist?)")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                         and f.default is dataclasses.MISSING)
        if missing:
            raise RunRecordError(f"not a run record (no {', '.join(missing)})")
        return cls(**data)

    def compare(self, current: RunRecord) -> tuple[list[str], list[dict[str, Any]]]:
        """What differs between this (a checkpoint's) record and `current`: (refusals, events).

        A refusal makes the checkpoint unusable here (shapes, the tokenizer: token ids would
        mean other words; the same data folder with other rows or another seed: the sample
        stream would be another). An event is a deliberate change the run continues with,
        logged as such (token dropping settings, the global batch). A value either record
        lacks is not compared. The TP x DP layout is no refusal: see `layout_changed`."""
        refusals = [f"{f}: checkpoint {self.model.get(f)}, now {current.model.get(f)}"
                    for f in SHAPE_FIELDS if self.model.get(f) != current.model.get(f)]
        if _differ(self.tokenizer_fingerprint, current.tokenizer_fingerprint):
            refusals.append(f"the --data-path tokenizer: checkpoint fingerprint {self.tokenizer_fingerprint}, "
                            f"now {current.tokenizer_fingerprint} (the same ids would mean other tokens; "
                            "use data prepared with the checkpoint's tokenizer)")
        if not self.data_switch(current):
            if _differ(self.num_samples, current.num_samples):
                refusals.append(f"the checkpoint was trained on {self.num_samples} rows of {self.data_path}, "
                                f"which now holds {current.num_samples}: restore that data, or resume with "
                                "the same --data-path as before")
            seeds = [(r.train_config or {}).get("seed") for r in (self, current)]
            if _differ(*seeds):
                refusals.append(f"the checkpoint's data seed is {seeds[0]}, this run's {seeds[1]}: "
                                f"resume with --seed {seeds[0]}")
        events = [{"event": kind, "checkpoint": getattr(self, key), "now": getattr(current, key)}
                  for key, kind in (("token_drop", "token_drop_change"), ("global_batch_size", "global_batch_change"))
                  if _differ(getattr(self, key), getattr(current, key))]
        return refusals, events

    def data_switch(self, current: RunRecord) -> dict[str, list[Any]]:
        """What changed in the training data since this record: {flag: [checkpoint, now]} for
        --data-path (compared as resolved folders) and --seq-length; empty for the same data."""
        def folder(path: str | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        changes = {"--data-path": [folder(self.data_path), folder(current.data_path)],
                   "--seq-length": [self.seq_length, current.seq_length]}
        return {flag: pair for flag, pair in changes.items() if pair[0] != pair[1]}

    def layout_changed(self, current: RunRecord) -> bool:
        """True when the records differ in TP or DP size (the checkpoint cannot load as saved)."""
        return (self.tensor_model_parallel_size != current.tensor_model_parallel_size
                or self.dp_size != current.dp_size)


def _is_dict(kind: Any) -> bool:
    return any(typing.get_origin(k) is dict for k in (kind, *typing.get_args(kind)))


def _all_int(data: dict[str, Any], *keys: str) -> bool:
    return all(type(data.get(k)) is int and data[k] > 0 for k in keys)


def _differ(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a != b


def read(path: Path) -> RunRecord:
    """The run record in file `path`; RunRecordError naming the file when it is unusable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        text = str(exc).strip().splitlines()
        raise RunRecordError(f"{path} is unreadable ({text[0] if text else type(exc).__name__})") from None
    try:
        return RunRecord.from_dict(data)
    except RunRecordError as exc:
        raise RunRecordError(f"{path}: {exc}") from None


def write(path: Path, record: RunRecord) -> None:
    """Write `record` to `path` atomically (readers see the old file or the new, never a part)."""
    atomic_write(path, json.dumps(record.to_dict(), indent=2, sort_keys=True))

