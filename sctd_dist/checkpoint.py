"""ZeRO checkpoints that a kill at any moment cannot corrupt, and exact resumption.

One `Checkpointer` per run owns the three questions:

* when to save (`SavePolicy`): every --save-interval steps, after the last step, and at the step
  boundary after a stop signal;
* what to save: the DeepSpeed engine (model, optimizer and ZeRO shards, LR schedule) and the
  run's other stateful objects, each with `state_dict()` / `load_state_dict()`: the importance
  table and the data position are the same on every rank (rank 0 writes them once, to
  `sctd_state.pt`), the RNG streams differ per rank (`rng_rank{R}.pt`);
* how to resume (`ResumePlan`): the checkpoint `latest` names (the newest complete one when the
  pointer is gone), verified against the sizes and CRC-32s its run record lists (else the next
  older one that verifies, or stop: --on-bad-checkpoint), compared with this run, converted once
  for this run's layout when the tensor- or data-parallel size changed (`sctd_dist.reshard`),
  and whether the run moved to other data (`data_switch`).

A checkpoint is written in one place (`Checkpointer._write`) and read in one place
(`plan_resume` decides, `Checkpointer._read` loads). Beside DeepSpeed's files a folder holds
`sctd_run.json` (what was trained: shapes, layout, step, the checksums of the other files). The
`latest` pointer is ours: rank 0 moves it atomically only after every rank has finished writing
(DeepSpeed's own pointer can move before the other ranks' shards are on disk); a failed save
removes its folder and leaves the pointer alone. Our own files load as data only
(`weights_only=True`); DeepSpeed's are unpickled by DeepSpeed, so a checkpoint folder must be
as trusted as the code (see the README).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sctd_dist import reshard, run_record
from sctd_dist.coordination import atomic_write, barrier, is_rank0, rank, say, share_work, world_size
from sctd_dist.parallel.random import SHARDED_RNG
from sctd_dist.run_record import RunRecord, RunRecordError

LATEST = "latest"
TAG = re.compile(r"global_step(\d+)")  # the only names `latest` may hold
RUN_FILE = run_record.FILE
ON_BAD = ("fallback", "stop")  # what a restart does when the newest checkpoint fails to verify
# Replicated training state that is not a parameter (the token-importance table, the data
# position). DeepSpeed saves module buffers too, but its universal-checkpoint path does not load
# them back.
STATE_FILE = "sctd_state.pt"
# The name of the stateful object that is the data position (the training data loader).
DATA_POSITION = "data"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; the message names the file and what to do."""


def _numpy_rng_globals() -> list[Any]:
    """What NumPy's RNG state (a uint32 array inside a tuple) needs from the unpickler."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state_file(path: Path) -> Any:
    """Load one of our own state files (`sctd_state.pt`, `rng_rank{R}.pt`) as data only.

    `weights_only=True` unpickles tensors, containers, numbers and strings, plus the NumPy types
    allow-listed above, and refuses anything else: a planted callable is never run."""
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds objects that are not checkpoint data ({first_line(exc)}); "
                              "refusing to load it: restore the checkpoint from a trusted copy") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is unreadable ({first_line(exc)}); restore it or remove "
                              "the checkpoint folder") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's and DeepSpeed's run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else -1


def complete_tags(load_dir: Path) -> list[str]:
    """The checkpoints in `load_dir` whose run record was written (the last file of a save),
    newest first."""
    if not load_dir.is_dir():
        return []
    tags = [p.name for p in load_dir.iterdir() if TAG.fullmatch(p.name) and (p / RUN_FILE).is_file()]
    return sorted(tags, key=_step_of, reverse=True)


def resume_candidates(load_dir: Path | None) -> tuple[list[str], list[str]]:
    """The checkpoints a restart may load, best first, and warnings about the `latest` pointer.

    `latest` names the checkpoint to resume (older complete ones are fallbacks). It may only
    name a `global_stepN` folder of `load_dir`. Deleted, empty, or naming a folder that is not a
    complete checkpoint: the newest complete checkpoint is taken instead, so a run never starts
    from step 0 over existing checkpoints.
    """
    if load_dir is None:
        return [], []
    load_dir = Path(load_dir)
    pointer = load_dir / LATEST
    tags = complete_tags(load_dir)
    if not pointer.exists():
        problem = f"{pointer} is missing"
    elif not pointer.is_file():
        raise CheckpointError(f"{pointer} is not a file; remove it (the newest complete checkpoint "
                              "is then resumed)")
    else:
        text = pointer.read_text(errors="replace").strip()
        if text and not TAG.fullmatch(text):
            raise CheckpointError(
                f"{pointer} holds {text[:100]!r}, which is not a checkpoint tag: it may only name a "
                f"global_stepN folder of {load_dir}; write one, or delete it to resume from the "
                "newest complete checkpoint")
        if text in tags:
            return [t for t in tags if _step_of(t) <= _step_of(text)], []
        problem = f"{pointer} is empty" if not text else \
            f"{pointer} names {text}, which is not a complete checkpoint"
        if not tags:
            raise CheckpointError(f"{problem} and {load_dir} holds no complete checkpoint; restore "
                                  "the checkpoint, or delete the pointer to start a new run there")
    if not tags:
        return [], []
    return tags, [f"{problem}: resuming from the newest complete checkpoint, {tags[0]}"]


def latest_tag(load_dir: Path | None) -> str | None:
    """The checkpoint a restart resumes from first (see `resume_candidates`), or None."""
    tags, _ = resume_candidates(load_dir)
    return tags[0] if tags else None


def read_run(load_dir: Path, tag: str) -> RunRecord:
    """The run record (`sctd_run.json`) of checkpoint `tag`."""
    try:
        return run_record.read(Path(load_dir) / tag / RUN_FILE)
    except RunRecordError as exc:
        raise CheckpointError(str(exc)) from None


def _checksum(path: Path) -> list[int]:
    """[size, CRC-32] of a file: finds truncated and garbled files (integrity, not authenticity:
    CRC-32 is fast enough to run over every checkpoint file at each save)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return [path.stat().st_size, crc]


def checksums_of(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """`{name: [size, CRC-32]}` of the named files of `folder`, each file read by one rank."""
    return share_work(lambda name: _checksum(folder / name), names)


def checksums(folder: Path) -> dict[str, list[int]]:
    """`checksums_of` every file of a checkpoint folder but its run record."""
    return checksums_of(folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                       if p.is_file() and p.name != RUN_FILE))


def verify(load_dir: Path, tag: str) -> RunRecord:
    """The run record of checkpoint `tag` once every file it lists is present and unchanged;
    otherwise CheckpointError naming the first bad file."""
    folder = Path(load_dir) / tag
    record = read_run(load_dir, tag)
    saved = record.files
    if saved is None:  # written before sctd-dist recorded checksums: nothing to compare
        return record
    for name in sorted(saved):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing")
    now = checksums_of(folder, sorted(saved))
    for name in sorted(saved):
        (size, crc), (saved_size, saved_crc) = now[name], saved[name]
        if size != saved_size:
            raise CheckpointError(f"{folder / name} is truncated or altered ({size} bytes, "
                                  f"{saved_size} when saved)")
        if crc != saved_crc:
            raise CheckpointError(f"{folder / name} is corrupt (its checksum differs from the saved one)")
    return record


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


def check_compatible(saved: RunRecord, current: RunRecord) -> list[dict[str, Any]]:
    """Raise ValueError naming every difference that makes the checkpoint unusable here; return
    the changes the run continues with (see `RunRecord.compare`)."""
    refusals, events = saved.compare(current)
    if refusals:
        raise ValueError("checkpoint does not fit this run (" + "; ".join(refusals) + "); restart with "
                         "the checkpoint's values or point --load/--save at a new folder")
    return events


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a restart loads, and how."""

    load_dir: Path  # the folder DeepSpeed loads from (a conversion's folder when resharding)
    tag: str  # the checkpoint DeepSpeed loads there
    source_tag: str  # the checkpoint as saved, in the run's --load folder
    saved: RunRecord  # the run record of the checkpoint
    universal: bool  # DeepSpeed loads a universal checkpoint (`checkpoint.load_universal`)
    layout_changed: bool  # saved at another TP x DP layout: converted, per-rank RNG streams reseeded
    data_switch: dict[str, list[Any]]  # see `RunRecord.data_switch`; empty when the data is the same
    warnings: tuple[str, ...] = ()  # what the restart passed over to get here, one line each
    changes: tuple[dict[str, Any], ...] = ()  # settings that differ from the checkpoint's, as events


def check_resume(load_dir: Path | None, current: RunRecord) -> None:
    """Refuse, before any process group exists, a checkpoint that cannot load into this run, also
    not at another layout (ValueError). Reads the record of the checkpoint a restart tries first;
    verifying its files (and falling back) is `plan_resume`'s."""
    tag = latest_tag(load_dir)
    if tag is None:
        return
    try:
        saved = read_run(Path(load_dir), tag)
    except CheckpointError:
        return  # plan_resume names the file and falls back or stops
    check_compatible(saved, current)
    if saved.layout_changed(current):
        reshard.check_supported(saved, current)


def choose_checkpoint(load_dir: Path | None, on_bad: str = "fallback") -> tuple[str, RunRecord, list[str]] | None:
    """(tag, run record, warnings) of the checkpoint to resume: the best candidate that verifies
    (`on_bad="fallback"`), or the best candidate or an error (`"stop"`). None for a new run."""
    tags, warnings = resume_candidates(load_dir)
    rejected: list[str] = []
    for tag in tags:
        try:
            return tag, verify(Path(load_dir), tag), warnings + rejected
        except CheckpointError as exc:
            if on_bad == "stop":
                raise CheckpointError(f"{exc}; restore it, or pass --on-bad-checkpoint fallback to "
                                      "resume from the newest checkpoint that verifies") from None
            rejected.append(f"{exc}: skipping {tag}")
    if tags:
        raise CheckpointError(f"no checkpoint in {load_dir} verifies ({rejected[0]}); restore one, or "
                              "point --save/--load at a new folder")
    return None


def plan_resume(load_dir: Path | None, current: RunRecord, on_bad: str = "fallback",
                tp_rank: int = 0, dp_rank: int = 0) -> ResumePlan | None:
    """Decide what a restart loads, before the engine exists (a universal load is a setting of
    the DeepSpeed config); None for a new run. Every rank calls this once process groups exist.

    Verifies the checkpoint (falling back per `on_bad`), compares its record with this run's
    (ValueError for what cannot load), and converts a checkpoint of another TP x DP layout
    once, for this rank's place in the new layout (`tp_rank`, `dp_rank`). What the plan passes
    over or changes is said by the caller, once (`ResumePlan.warnings`, `.changes`)."""
    chosen = choose_checkpoint(load_dir, on_bad)
    if chosen is None:
        return None
    (tag, saved, warnings), load_dir = chosen, Path(load_dir)
    changes = check_compatible(saved, current)
    moved = saved.layout_changed(current)
    target = reshard.LoadTarget(load_dir, tag, universal=False)
    if moved:
        reshard.check_supported(saved, current)
        target = reshard.prepare(load_dir, tag, saved, current.tensor_model_parallel_size, tp_rank, dp_rank)
    return ResumePlan(load_dir=target.load_dir, tag=target.tag, source_tag=tag, saved=saved,
                      universal=target.universal, layout_changed=moved,
                      data_switch=saved.data_switch(current), warnings=tuple(warnings),
                      changes=tuple(changes))


def resume_ds_config(plan: ResumePlan | None, ds: dict[str, Any]) -> dict[str, Any]:
    """`ds`, set to load the planned checkpoint (a universal one is a setting of the config)."""
    if plan is None or not plan.universal:
        return ds
    return {**ds, "checkpoint": {"load_universal": True}}


def checkpoint_size(plan: ResumePlan | None, new_run_bytes: int) -> int:
    """About the bytes of the next checkpoint: the resumed one's size, else `new_run_bytes`."""
    if plan is None or plan.saved.files is None:
        return new_run_bytes
    return sum(size for size, _ in plan.saved.files.values())


def check_writable(save_dir: Path) -> None:
    """Raise CheckpointError unless `save_dir` is a folder (made if missing) that takes files:
    found at start, not at the first save."""
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"--save {save_dir} is a file, not a folder; point --save at a folder")
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write_test{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"--save {save_dir} is not writable ({first_line(exc)}); fix its "
                              "permissions or point --save at another folder") from None


def check_free_space(save_dir: Path, checkpoint_bytes: int) -> None:
    """Raise CheckpointError unless `save_dir` has room for a checkpoint of `checkpoint_bytes`."""
    existing = Path(save_dir).absolute()
    while not existing.exists():  # a folder the first save creates: its disk is the parent's
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < checkpoint_bytes:
        raise CheckpointError(f"--save {save_dir} has {free / 2**20:.1f} MiB free, but a checkpoint of "
                              f"this run takes about {checkpoint_bytes / 2**20:.1f} MiB; free space or "
                              "point --save at another disk")


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

    Made with the run's `ResumePlan` (None: a new run); no collectives, no file access.
    `start(engine)` loads the plan; the training loop calls `after_step` once per optimizer step.
    """

    def __init__(self, policy: SavePolicy, load_dir: Path | None, record: RunRecord,
                 states: dict[str, Stateful], plan: ResumePlan | None = None, *,
                 keep_data_position: bool = False) -> None:
        self.policy = policy
        self.load_dir = None if load_dir is None else Path(load_dir)
        self.record = record  # what this run is, written with each save
        self.states = states
        self.plan = plan
        # On a data switch, continue the data position (DATA_POSITION state) instead of
        # starting the new data at its first sample.
        self.keep_data_position = keep_data_position
        self.engine: Any = None

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
        """Save a complete checkpoint of step `step`; move `latest` only once it is whole.

        A save that fails on any rank (disk full, permission) removes the partial folder and
        raises CheckpointError on every rank; `latest` keeps naming the previous checkpoint."""
        save_dir = Path(self.policy.save_dir)
        tag = tag_for(step)
        folder = save_dir / tag
        record = self.record.with_step(step)

        def fresh_folder() -> None:
            save_dir.mkdir(parents=True, exist_ok=True)
            # Left by a killed save, or a checkpoint a restart refused: never mixed with this one.
            shutil.rmtree(folder, ignore_errors=True)

        def files() -> None:
            self.engine.save_checkpoint(str(save_dir), tag=tag, client_state={"sctd_run": record.to_dict()},
                                        save_latest=False)
            for name, obj in self.states.items():
                if _per_rank(obj):
                    torch.save(obj.state_dict(), folder / f"{name}_rank{rank()}.pt")
            if is_rank0():
                torch.save({name: obj.state_dict() for name, obj in self.states.items()
                            if not _per_rank(obj)}, folder / STATE_FILE)

        def commit() -> None:
            run_record.write(folder / RUN_FILE, record.with_step(step, sums))
            atomic_write(save_dir / LATEST, tag)

        self._agree_or_undo(fresh_folder if is_rank0() else None, folder)
        self._agree_or_undo(files, folder)  # every rank's files are on disk
        sums = checksums(folder)
        self._agree_or_undo(commit if is_rank0() else None, folder)
        if is_rank0() and self.policy.keep_last:
            prune(save_dir, self.policy.keep_last)
        barrier()
        return folder

    def _agree_or_undo(self, work: Any, folder: Path) -> None:
        """Run `work` (None: nothing on this rank); when it failed on any rank, remove the
        partial `folder` and raise one CheckpointError on every rank, naming the failure."""
        error = None
        if work is not None:
            try:
                work()
            except Exception as exc:  # OSError, torch's RuntimeError("... file write failed"), ...
                error = first_line(exc)
        errors = [e for e in share_work(lambda _: error, list(range(world_size()))).values() if e]
        if not errors:
            return
        if is_rank0():
            shutil.rmtree(folder, ignore_errors=True)
        barrier()
        pointer = folder.parent / LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else "no checkpoint"
        free = shutil.disk_usage(folder.parent).free / 2**20
        raise CheckpointError(f"saving {folder} failed ({errors[0]}; {free:.1f} MiB free there); removed "
                              f"the partial folder, {pointer} still names {previous}: free space or fix "
                              "the folder, then rerun to resume from there")

    def _read(self, plan: ResumePlan) -> int:
        """Load `plan` into the engine and the stateful objects; returns its step. Per-rank
        states are restored only where the layout is unchanged (otherwise the new layout's own
        seeds stay); after a data switch the data position stays at the new data's first sample
        unless `keep_data_position`."""
        try:
            path, _ = self.engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"DeepSpeed could not load {plan.load_dir / plan.tag} "
                                  f"({first_line(exc)}); restore it or remove the folder") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {plan.tag} from {plan.load_dir}")
        source = self.load_dir / plan.source_tag
        replicated = load_state_file(source / STATE_FILE)
        missing = sorted(n for n, obj in self.states.items() if not _per_rank(obj) and n not in replicated)
        if missing:
            raise CheckpointError(f"{source / STATE_FILE} holds no {missing} state: the checkpoint was "
                                  "written by an older sctd-dist, which kept the data position elsewhere")
        fresh_data = bool(plan.data_switch) and not self.keep_data_position
        for name, obj in self.states.items():
            own = source / f"{name}_rank{rank()}.pt"
            if name == DATA_POSITION and fresh_data:
                continue
            if not _per_rank(obj):
                obj.load_state_dict(replicated[name])
            elif not plan.layout_changed:  # this rank's own streams must be there
                if not own.is_file():
                    raise CheckpointError(f"{own} is missing: this rank's state cannot be restored at an "
                                          "unchanged layout; restore the file or resume an older checkpoint")
                obj.load_state_dict(load_state_file(own))
        return plan.saved.step
