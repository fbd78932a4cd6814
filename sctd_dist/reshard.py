"""Resuming a checkpoint at another tensor-parallel x data-parallel layout.

A checkpoint holds, per TP rank, ZeRO partitions (or, at ZeRO-0, whole copies) of that rank's
parameter shards with their fp32 master weights and Adam moments. To load it at another layout
we convert it once, before the engine exists, into files that the new layout's ranks load
with DeepSpeed's own loaders:

1. *Merge over DP.* ZeRO-1/2/3: DeepSpeed's `ds_to_universal` merges the ZeRO partitions of
   every TP rank into whole per-parameter tensors (fp32 weight, `exp_avg`, `exp_avg_sq`, step).
   We describe no TP layout to it, so it stacks the TP shards of each tensor along dimension 0;
   equal-shaped shards come apart exactly again. ZeRO-0 needs no merge: every DP rank holds the
   same torch optimizer state, read from the model-states file of each TP rank.
2. *Re-split over TP.* Our own layout description (`sctd_dist.parallel.layout`, the one the
   Hugging Face import and export use) merges the TP shards into the logical tensor (vocabulary
   padding removed) and cuts the new rank's shard (padded for the new TP size, zeros in the
   padding rows, which never train).
3. *Load.* ZeRO-1/2/3: each new TP rank gets a universal checkpoint of its own whose tensors
   have exactly its parameters' shapes; DeepSpeed's universal loader then only re-partitions
   them over the new DP size. ZeRO-0: a native checkpoint with one model-states file per new TP
   rank.

Why not let DeepSpeed split TP too (Megatron-DeepSpeed's `universal_checkpoint_info`): its
loader slices TP for ZeRO-1/2 only (ZeRO-3 needs DeepSpeed's own AutoTP to be active), its
vocabulary handling assumes 2-D tensors (our vocab-parallel MLM bias is 1-D), and ZeRO-0 in
fp32 has no universal load at all. Splitting ourselves gives every stage one code path.

Preserved: fp32 master weights, Adam moments and step, LR schedule and the loss-scaler state
(from DeepSpeed's files); the caller restores the importance table, the sample position and
the step counter from our own files as for any resume. Not preserved: the per-rank RNG streams
(the new layout is seeded afresh, so dropout masks differ from an uninterrupted run) and the
bf16/fp16 copies of the weights, which are re-derived from the fp32 masters.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from sctd_dist.coordination import barrier, is_rank0
from sctd_dist.parallel import layout
from sctd_dist.run_record import RunRecord

# Conversions live beside the checkpoints, in their own namespace: DIR/resharded/<tag>/...
RESHARD_DIR = "resharded"
_STATES = ("fp32", "exp_avg", "exp_avg_sq")
_DONE = ".complete"


@dataclass(frozen=True)
class LoadTarget:
    """Where this rank's engine loads a resharded checkpoint from."""

    load_dir: Path
    tag: str
    universal: bool  # set `checkpoint.load_universal` in the DeepSpeed config


def check_supported(saved: RunRecord, current: RunRecord) -> None:
    """Raise ValueError when a layout change meets a ZeRO-stage change we cannot convert."""
    a, b = saved.zero_stage, current.zero_stage
    family = {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    if family[a] != family[b]:
        raise ValueError(f"the checkpoint was saved with ZeRO stage {a} and this run uses stage {b}; "
                         f"a checkpoint moves to another layout within {family[a]} only: resume "
                         f"with a --deepspeed_config of ZeRO stage {a}")


def prepare(load_dir: Path, tag: str, saved: RunRecord, tp_size: int, tp_rank: int,
            dp_rank: int) -> LoadTarget:
    """Convert checkpoint `tag` for TP size `tp_size` (once; every rank calls this).

    Rank 0 merges over DP (ZeRO-1/2/3); each DP-rank-0 process then writes its own TP rank's
    files. A conversion interrupted by a crash is redone: only a complete one is marked done."""
    source = Path(load_dir) / tag
    work = Path(load_dir) / RESHARD_DIR / tag
    out = work / f"tp{tp_size}"
    stage = saved.zero_stage
    if stage == 0 and saved.tensor_model_parallel_size == tp_size:
        return LoadTarget(load_dir=Path(load_dir), tag=tag, universal=False)  # replicated over DP
    if stage == 0:  # every rank checks, so that every rank refuses (none waits at a barrier)
        _check_plain_optimizer(source, saved)
    if not (out / _DONE).is_file():
        if is_rank0():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
        merged = work / "universal"
        if stage > 0 and is_rank0() and not (merged / _DONE).is_file():
            _merge_zero_partitions(source, merged)
        barrier()
        if dp_rank == 0:
            if stage > 0:
                _write_universal_rank(merged, source, out / f"rank{tp_rank}", saved, tp_size, tp_rank)
            else:
                _write_native_rank(source, out, saved, tp_size, tp_rank)
        barrier()
        if is_rank0():
            (out / _DONE).write_text("ok")
            shutil.rmtree(merged, ignore_errors=True)  # the per-rank files hold everything now
        barrier()
    if stage > 0:
        return LoadTarget(load_dir=out, tag=f"rank{tp_rank}", universal=True)
    return LoadTarget(load_dir=work, tag=out.name, universal=False)


def remove(load_dir: Path, tag: str) -> None:
    """Delete the conversions of checkpoint `tag` (when the checkpoint itself is pruned)."""
    shutil.rmtree(Path(load_dir) / RESHARD_DIR / tag, ignore_errors=True)


def _merge_zero_partitions(source: Path, merged: Path) -> None:
    """DeepSpeed's universal conversion (TP shards stacked along dim 0, see the module doc).

    Run in this process, one worker: no start-up cost, and no worker pool forked from a process
    that runs torch.distributed threads. DeepSpeed parses its own command line; we hand it one."""
    import contextlib
    from unittest import mock

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(merged, ignore_errors=True)
    argv = ["ds_to_universal", "--input_folder", str(source), "--output_folder", str(merged),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    merged.mkdir(parents=True)
    with open(merged.parent / "universal.log", "w") as log, mock.patch.object(sys, "argv", argv), \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal.main(ds_to_universal.parse_arguments())
    (merged / _DONE).write_text("ok")


def _padded_vocab(saved: RunRecord, tp_size: int) -> int:
    from sctd_dist.model.arch import config_from_dict

    return config_from_dict(saved.model).padded_vocab_size(tp_size)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _model_state_files(source: Path, stage: int) -> list[Path]:
    """The model-states file of each saved TP rank (DP rank 0), in TP-rank order."""
    pattern = "zero_pp_rank_0_mp_rank_*_model_states.pt" if stage == 3 else "mp_rank_*_model_states.pt"
    return sorted(source.glob(pattern))


def _param_names(meta: dict[str, Any]) -> list[str]:
    """ZeRO-0: parameter names in optimizer order (the module's entries that are not buffers)."""
    buffers = set(meta.get("buffer_names") or ())
    return [n for n in meta["module"] if n not in buffers]


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or no hard links
        shutil.copy2(src, dest)


def _resplit(shards: list[torch.Tensor], name: str, saved: RunRecord, tp_size: int,
             tp_rank: int) -> torch.Tensor:
    whole = layout.merge(shards, name, saved.model["vocab_size"])
    return layout.split(whole, name, tp_size, tp_rank, _padded_vocab(saved, tp_size)).contiguous().clone()


def _write_universal_rank(merged: Path, source: Path, dest: Path, saved: RunRecord,
                          tp_size: int, tp_rank: int) -> None:
    """A universal checkpoint holding exactly TP rank `tp_rank`'s parameter shards."""
    old_tp = saved.tensor_model_parallel_size
    meta_files = _model_state_files(source, saved.zero_stage)
    meta = _load(meta_files[0])
    shapes = {n: shape for group in meta["param_shapes"] for n, shape in group.items()}  # TP shards
    for name, shape in shapes.items():
        for key in _STATES:
            entry = torch.load(merged / "zero" / name / f"{key}.pt", map_location="cpu", weights_only=False)
            stacked = entry["param"] if isinstance(entry, dict) else entry  # ZeRO-3 at TP=1: bare, flat
            shards = [s.view(shape) for s in stacked.reshape(-1).chunk(old_tp)]
            # Only `param`: the loader must not re-slice or re-pad a tensor that already fits.
            target = dest / "zero" / name / f"{key}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"param": _resplit(shards, name, saved, tp_size, tp_rank)}, target)
        step = merged / "zero" / name / "step.pt"
        if step.is_file():  # ZeRO-1/2 keep the Adam step per parameter, ZeRO-3 in optimizer_state.pt
            _link(step, dest / "zero" / name / "step.pt")
    _link(merged / "zero" / "optimizer_state.pt", dest / "zero" / "optimizer_state.pt")
    # DeepSpeed reads the LR schedule, step counters and client state from a model-states file; a
    # universal load takes no weights from it. One file of one "TP rank" per folder.
    torch.save({**meta, "module": {}, "mp_world_size": 1}, dest / meta_files[0].name)


def _check_plain_optimizer(source: Path, saved: RunRecord) -> None:
    """ZeRO-0: ValueError unless the checkpoint holds a plain torch optimizer state (in bf16/fp16
    DeepSpeed wraps it in a mixed-precision optimizer whose flat buffers we do not re-split)."""
    opt = torch.load(_model_state_files(source, 0)[0], map_location="cpu", weights_only=False,
                     mmap=True).get("optimizer")
    if not (isinstance(opt, dict) and "state" in opt and "param_groups" in opt):
        raise ValueError(f"{source} (ZeRO-0, mixed precision) cannot move to another "
                         "--tensor-model-parallel-size: resume at the saved "
                         f"--tensor-model-parallel-size {saved.tensor_model_parallel_size}, or train "
                         "with ZeRO-1/2/3 to change layouts")


def _tensor_parallel_states(source: Path, saved: RunRecord) -> Iterator[tuple[str, dict[str, Any]]]:
    """ZeRO-0: (name, {fp32, exp_avg, exp_avg_sq: TP shards; step}) from each TP rank's file."""
    files = [_load(f) for f in _model_state_files(source, 0)]
    names = _param_names(files[0])
    count = sum(len(g["params"]) for g in files[0]["optimizer"]["param_groups"])
    if count != len(names):
        raise RuntimeError(f"{source}: {len(names)} parameters but {count} optimizer entries")
    for index, name in enumerate(names):
        states = [f["optimizer"]["state"].get(index, {}) for f in files]
        entry: dict[str, Any] = {"fp32": [f["module"][name].float() for f in files]}
        if states[0]:
            entry["exp_avg"] = [s["exp_avg"] for s in states]
            entry["exp_avg_sq"] = [s["exp_avg_sq"] for s in states]
            entry["step"] = states[0]["step"]
        yield name, entry


def _write_native_rank(source: Path, dest: Path, saved: RunRecord, tp_size: int,
                       tp_rank: int) -> None:
    """ZeRO-0: TP rank `tp_rank`'s model-states file (weights and torch optimizer state)."""
    base = _load(_model_state_files(source, 0)[0])
    module = dict(base["module"])  # buffers (the importance table) are replicated: kept as they are
    opt_state: dict[int, dict[str, Any]] = {}
    for index, (name, entry) in enumerate(_tensor_parallel_states(source, saved)):
        module[name] = _resplit(entry["fp32"], name, saved, tp_size, tp_rank).to(base["module"][name].dtype)
        if "step" in entry:
            opt_state[index] = {"step": entry["step"],
                                "exp_avg": _resplit(entry["exp_avg"], name, saved, tp_size, tp_rank),
                                "exp_avg_sq": _resplit(entry["exp_avg_sq"], name, saved, tp_size, tp_rank)}
    base["module"] = type(base["module"])(module)
    base["optimizer"] = {"state": opt_state, "param_groups": base["optimizer"]["param_groups"]}
    base["mp_world_size"] = tp_size
    torch.save(base, dest / f"mp_rank_{tp_rank:02d}_model_states.pt")
