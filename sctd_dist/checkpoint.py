"""ZeRO checkpoints that a kill at any moment cannot corrupt, and exact resumption.

One `Checkpointer` per run owns the three questions:

* when to save (`SavePolicy`): every --save-interval steps, after the last step, and at the step
  boundary after a stop signal;
* what to save: the DeepSpeed engine (model, optimizer and ZeRO shards, LR schedule) and the
  run's other stateful objects, each with `state_dict()` / `load_state_dict()`: the importance
  table and the data position are the same on every rank (rank 0 writes them once, to
  `sctd_state.pt`), the RNG streams differ per rank (`rng_rank{R}.pt`);
* how to resume (`ResumePlan`): the newest complete checkpoint, checked against this run,
  converted once for this run's layout when the tensor- or data-parallel size changed
  (`sctd_dist.reshard`), and whether the run moved to other data (`data_switch`).

A checkpoint is written in one place (`Checkpointer._write`) and read in one place
(`plan_resume` decides, `Checkpointer._read` loads). Beside DeepSpeed's files a folder holds
`sctd_run.json` (what was trained: shapes, layout, step). The `latest` pointer is ours: rank 0
moves it atomically only after every rank has finished writing (DeepSpeed's own pointer can move
before the other ranks' shards are on disk).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sctd_dist import reshard
from sctd_dist.coordination import atomic_write, barrier, is_rank0, rank, rank0_first
from sctd_dist.parallel.random import SHARDED_RNG

LATEST = "latest"
RUN_FILE = "sctd_run.json"
# Replicated training state that is not a parameter (the token-importance table, the data
# position). DeepSpeed saves module buffers too, but its universal-checkpoint path does not load
# them back.
STATE_FILE = "sctd_state.pt"
# The name of the stateful object that is the data position (the training data loader).
DATA_POSITION = "data"
# Fields that fix parameter shapes: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size")


class Stateful(Protocol):
    """What the checkpointer saves besides the engine. `per_rank = True` on the class: every
    rank's state is its own (one file per rank); otherwise it is identical on every rank."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGStreams:
    """Every random stream this rank draws from (Python, NumPy, torch, CUDA, the TP-sharded one)."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(),
                 "torch": torch.get_rng_state(), "sharded": SHARDED_RNG.get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        SHARDED_RNG.set_states(state["sharded"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def _per_rank(obj: Stateful) -> bool:
    return bool(getattr(obj, "per_rank", False))


def tag_for(step: int) -> str:
    """The folder name of the checkpoint taken after `step` optimizer steps."""
    return f"global_step{step}"


def _step_of(tag: str) -> int:
    return int(tag.removeprefix("global_step")) if tag.startswith("global_step") else -1


def latest_tag(load_dir: Path | None) -> str | None:
    """The newest complete checkpoint in `load_dir`, or None."""
    if load_dir is None:
        return None
    pointer = Path(load_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(load_dir) / tag / RUN_FILE).is_file():
        raise RuntimeError(f"{pointer} names {tag!r}, which is incomplete; remove the pointer or restore it")
    return tag


def read_run(load_dir: Path, tag: str) -> dict[str, Any]:
    """The run record (`sctd_run.json`) of checkpoint `tag`."""
    return json.loads((Path(load_dir) / tag / RUN_FILE).read_text())


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints (never the one `latest` names)."""
    current = (save_dir / LATEST).read_text().strip()
    tags = sorted((p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith("global_step")),
                  key=lambda p: _step_of(p.name))
    complete = [p for p in tags if (p / RUN_FILE).is_file()]
    doomed = [p for p in complete[:-keep_last] if p.name != current]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        reshard.remove(save_dir, p.name)
    return doomed


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ValueError naming every difference that makes the checkpoint unloadable."""
    diffs = []
    for f in SHAPE_FIELDS:
        a, b = saved["model"].get(f), current["model"].get(f)
        if a != b:
            diffs.append(f"{f}: checkpoint {a}, now {b}")
    if diffs:
        raise ValueError("checkpoint does not fit this run (" + "; ".join(diffs) + "); restart with "
                         "the checkpoint's values or point --load/--save at a new folder")


def data_switch(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """What changed in the training data since the checkpoint: {flag: [checkpoint, now]} for
    --data-path (compared as resolved folders) and --seq-length; empty for the same data."""
    def folder(record: dict[str, Any]) -> str | None:
        path = record.get("data_path")
        return None if path is None else str(Path(path).resolve())

    changes = {"--data-path": [folder(saved), folder(current)],
               "--seq-length": [saved.get("seq_length"), current.get("seq_length")]}
    return {flag: pair for flag, pair in changes.items() if pair[0] != pair[1]}


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a restart loads, and how."""

    load_dir: Path  # the folder DeepSpeed loads from (a conversion's folder when resharding)
    tag: str  # the checkpoint DeepSpeed loads there
    source_tag: str  # the checkpoint as saved, in the run's --load folder
    saved: dict[str, Any]  # the run record of the checkpoint
    universal: bool  # DeepSpeed loads a universal checkpoint (`checkpoint.load_universal`)
    layout_changed: bool  # saved at another TP x DP layout: converted, per-rank RNG streams reseeded
    data_switch: dict[str, list[Any]]  # see `data_switch`; empty when the data is the same


def check_resume(load_dir: Path | None, current: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The tag and run record of the checkpoint this run resumes (None: a new run); ValueError when it
    cannot load into this run, also not at another layout. Needs only the record's model,
    `tensor_model_parallel_size`, `dp_size` and `zero_stage`: it runs before any process group."""
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    saved = read_run(Path(load_dir), tag)
    check_compatible(saved, current)
    if reshard.layout_changed(saved, current):
        reshard.check_supported(saved, current)
    return tag, saved


def plan_resume(load_dir: Path | None, current: dict[str, Any], tp_rank: int = 0,
                dp_rank: int = 0) -> ResumePlan | None:
    """Decide before the engine exists (a universal load must be set in the DeepSpeed config).

    A checkpoint of another TP x DP layout is converted here, once, for this rank's place in the
    new layout (`tp_rank`, `dp_rank`); what cannot be converted raises ValueError."""
    found = check_resume(load_dir, current)
    if found is None:
        return None
    (tag, saved), load_dir = found, Path(load_dir)
    moved = reshard.layout_changed(saved, current)
    target = reshard.LoadTarget(load_dir, tag, universal=False)
    if moved:
        target = reshard.prepare(load_dir, tag, saved, current["tensor_model_parallel_size"], tp_rank, dp_rank)
    return ResumePlan(load_dir=target.load_dir, tag=target.tag, source_tag=tag, saved=saved,
                      universal=target.universal, layout_changed=moved,
                      data_switch=data_switch(saved, current))


@dataclass(frozen=True)
class SavePolicy:
    """When a run saves: every `interval` steps, after `last_step`, and when told to stop."""

    save_dir: Path | None  # None: never
    interval: int | None
    last_step: int
    keep_last: int | None = None  # prune to this many checkpoints after each save

    def due(self, step: int, stop: bool) -> bool:
        """Save after optimizer step number `step` (counted from 1)?"""
        if self.save_dir is None:
            return False
        return stop or step == self.last_step or bool(self.interval) and step % self.interval == 0


class Checkpointer:
    """Saves and resumes one run (see the module docstring).

    Made before the engine: it plans the resume at once, because a universal load is a setting
    of the DeepSpeed config (`deepspeed_config`). `start(engine)` then loads the plan; the
    training loop calls `after_step` once per optimizer step.
    """

    def __init__(self, policy: SavePolicy, load_dir: Path | None, record: dict[str, Any],
                 states: dict[str, Stateful], *, tp_rank: int = 0, dp_rank: int = 0,
                 keep_data_position: bool = False) -> None:
        self.policy = policy
        self.load_dir = None if load_dir is None else Path(load_dir)
        self.record = record  # what this run is, compared on resume and written with each save
        self.states = states
        # On a data switch, continue the data position (DATA_POSITION state) instead of
        # starting the new data at its first sample.
        self.keep_data_position = keep_data_position
        self.engine: Any = None
        self.plan = plan_resume(self.load_dir, record, tp_rank, dp_rank)

    def deepspeed_config(self, ds: dict[str, Any]) -> dict[str, Any]:
        """`ds`, set to load the planned checkpoint."""
        if self.plan is None or not self.plan.universal:
            return ds
        return {**ds, "checkpoint": {"load_universal": True}}

    def start(self, engine: Any) -> int:
        """Take charge of `engine`; load the planned checkpoint into it and into the stateful
        objects. Returns the number of optimizer steps already done (0 for a new run)."""
        self.engine = engine
        return 0 if self.plan is None else self._read(self.plan)

    def after_step(self, step: int, stop: bool) -> Path | None:
        """Called by every rank after optimizer step number `step` (counted from 1); `stop`: the
        run ends here (a signal). Returns the checkpoint folder when one was saved."""
        return self._write(step) if self.policy.due(step, stop) else None

    def _write(self, step: int) -> Path:
        """Save a complete checkpoint of step `step`; move `latest` only once it is whole."""
        save_dir = Path(self.policy.save_dir)
        tag = tag_for(step)
        folder = save_dir / tag
        record = {**self.record, "step": step}
        rank0_first(lambda: save_dir.mkdir(parents=True, exist_ok=True))
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state={"sctd_run": record},
                                    save_latest=False)
        for name, obj in self.states.items():
            if _per_rank(obj):
                torch.save(obj.state_dict(), folder / f"{name}_rank{rank()}.pt")
        if is_rank0():
            torch.save({name: obj.state_dict() for name, obj in self.states.items() if not _per_rank(obj)},
                       folder / STATE_FILE)
        barrier()  # every rank's files are on disk
        if is_rank0():
            atomic_write(folder / RUN_FILE, json.dumps(record, indent=2, sort_keys=True))
            atomic_write(save_dir / LATEST, tag)
            if self.policy.keep_last:
                prune(save_dir, self.policy.keep_last)
        barrier()
        return folder

    def _read(self, plan: ResumePlan) -> int:
        """Load `plan` into the engine and the stateful objects; returns its step. Per-rank
        states are restored only where the layout is unchanged (otherwise the new layout's own
        seeds stay); after a data switch the data position stays at the new data's first sample
        unless `keep_data_position`."""
        path, _ = self.engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {plan.tag} from {plan.load_dir}")
        source = self.load_dir / plan.source_tag
        replicated = torch.load(source / STATE_FILE, map_location="cpu", weights_only=False)
        missing = sorted(n for n, obj in self.states.items() if not _per_rank(obj) and n not in replicated)
        if missing:
            raise RuntimeError(f"{source / STATE_FILE} holds no {missing} state: the checkpoint was "
                               "written by an older sctd-dist, which kept the data position elsewhere")
        fresh_data = bool(plan.data_switch) and not self.keep_data_position
        for name, obj in self.states.items():
            own = source / f"{name}_rank{rank()}.pt"
            if name == DATA_POSITION and fresh_data:
                continue
            if not _per_rank(obj):
                obj.load_state_dict(replicated[name])
            elif not plan.layout_changed and own.is_file():
                obj.load_state_dict(torch.load(own, weights_only=False))
        return int(plan.saved["step"])
