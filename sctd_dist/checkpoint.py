"""ZeRO checkpoints that a kill at any moment cannot corrupt, and exact resumption.

DeepSpeed writes the model, optimizer and ZeRO shards. We add, per checkpoint folder:
`sctd_run.json` (what was trained: shapes, layout, data position) and one `rng_rank{R}.pt` per
rank. The `latest` pointer is ours: it is written atomically by rank 0 only after every rank has
finished writing (DeepSpeed's own pointer can move before the other ranks' shards are on disk).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sctd_dist.parallel.random import SHARDED_RNG

LATEST = "latest"
RUN_FILE = "sctd_run.json"
# Replicated training state that is not a parameter (the token-importance table). DeepSpeed saves
# module buffers too, but its universal-checkpoint path does not load them back.
STATE_FILE = "sctd_state.pt"
# Fields that fix parameter shapes: a checkpoint only loads into the same values.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _step_of(tag: str) -> int:
    return int(tag.removeprefix("global_step")) if tag.startswith("global_step") else -1


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, with fsyncs: the file is either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def rng_state() -> dict[str, Any]:
    """Every RNG this rank draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "sharded": SHARDED_RNG.get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    SHARDED_RNG.set_states(state["sharded"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, save_dir: Path, step: int, run: dict[str, Any], state: dict[str, Any],
         keep_last: int | None = None) -> Path:
    """Save a complete checkpoint of optimizer step `step`; move `latest` only once it is whole.

    `state`: replicated non-parameter state (identical on every rank; rank 0 writes it)."""
    save_dir = Path(save_dir)
    tag = tag_for(step)
    folder = save_dir / tag
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={"sctd_run": run}, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        torch.save(state, folder / STATE_FILE)
    _barrier()  # every rank's files are on disk
    if _rank() == 0:
        atomic_write_text(folder / RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
        atomic_write_text(save_dir / LATEST, tag)
        if keep_last:
            prune(save_dir, keep_last)
    _barrier()
    return folder


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints (never the one `latest` names)."""
    current = (save_dir / LATEST).read_text().strip()
    tags = sorted((p for p in save_dir.iterdir() if p.is_dir() and p.name.startswith("global_step")),
                  key=lambda p: _step_of(p.name))
    complete = [p for p in tags if (p / RUN_FILE).is_file()]
    doomed = [p for p in complete[:-keep_last] if p.name != current]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ValueError naming every difference that makes the checkpoint unloadable."""
    diffs = []
    for f in SHAPE_FIELDS:
        a, b = saved["model"].get(f), current["model"].get(f)
        if a != b:
            diffs.append(f"{f}: checkpoint {a}, now {b}")
    if saved["tensor_model_parallel_size"] != current["tensor_model_parallel_size"]:
        diffs.append(f"--tensor-model-parallel-size: checkpoint {saved['tensor_model_parallel_size']}, "
                     f"now {current['tensor_model_parallel_size']}")
    if diffs:
        raise ValueError("checkpoint does not fit this run (" + "; ".join(diffs) + "); restart with "
                         "the checkpoint's values or point --load/--save at a new folder")


def read_run(load_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((Path(load_dir) / tag / RUN_FILE).read_text())


@dataclass(frozen=True)
class ResumePlan:
    """Which checkpoint a restart loads, and how."""

    tag: str  # the folder DeepSpeed loads (a converted universal copy when resharding)
    source_tag: str  # the checkpoint as saved
    saved: dict[str, Any]  # the run record of the checkpoint
    universal: bool  # ZeRO shards are re-partitioned for a new data-parallel size


def plan_resume(load_dir: Path | None, current: dict[str, Any]) -> ResumePlan | None:
    """Decide before the engine exists (a universal load must be set in the DeepSpeed config)."""
    tag = latest_tag(load_dir)
    if tag is None:
        return None
    saved = read_run(load_dir, tag)
    check_compatible(saved, current)
    universal = saved["world_size"] != current["world_size"] and saved["zero_stage"] > 0
    load_tag = to_universal(Path(load_dir), tag) if universal else tag
    return ResumePlan(tag=load_tag, source_tag=tag, saved=saved, universal=universal)


def to_universal(load_dir: Path, tag: str) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; rank 0 converts).

    ZeRO shards are tied to the data-parallel size that wrote them; the universal format holds
    every parameter's fp32 weight and Adam moments whole, so any DP size can load it.
    """
    import subprocess
    import sys

    target = f"{tag}_universal"
    done = load_dir / target / ".complete"
    if _rank() == 0 and not done.is_file():
        shutil.rmtree(load_dir / target, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
             str(load_dir / tag), "--output_folder", str(load_dir / target),
             "--inject_missing_state"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {tag} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        done.write_text("ok")
    _barrier()
    return target


def load(engine, load_dir: Path, plan: ResumePlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the planned checkpoint into `engine`; restore this rank's RNG when the layout is
    unchanged (otherwise the seeds of the new layout stay).

    Returns (the saved run record, the replicated state given to `save`)."""
    path, _ = engine.load_checkpoint(str(load_dir), tag=plan.tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {plan.tag} from {load_dir}")
    source = Path(load_dir) / plan.source_tag
    rng_file = source / f"rng_rank{_rank()}.pt"
    if not plan.universal and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = torch.load(source / STATE_FILE, map_location="cpu", weights_only=False)
    return plan.saved, state
