"""`python -m sctd_dist.export --checkpoint DIR [--tag T] --out HF_DIR`

Consolidates a training checkpoint (any ZeRO stage, any TP size) into a Hugging Face
`BertForMaskedLM` or `ModernBertForMaskedLM` folder (safetensors + config + tokenizer) that loads with no custom code.

ZeRO-3 and TP>1 shards are merged by reading DeepSpeed's fp32 master weights per data-parallel
partition (DeepSpeed's own zero_to_fp32 cannot merge TP shards), so this runs in one process on
a CPU, without the job's GPUs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from sctd_dist import checkpoint, run_record
from sctd_dist.flags import add_flags, flag, from_flags
from sctd_dist.hf import merge_shards, save_hf
from sctd_dist.model.arch import HF_CLASSES, ModelConfig, arch_of, config_from_dict
from sctd_dist.run_record import RunRecord

_PREFIX = "mlm."  # the BERT inside PretrainingModel


def _tp_rank_state(folder: Path, tp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of one TP rank, merged over its data-parallel ZeRO partitions."""
    mp = f"mp_rank_{tp_rank:02d}"
    if zero_stage == 0:  # no partitions: the module state is whole in the model-states file
        state = torch.load(folder / f"{mp}_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's reader only knows model-parallel rank 0: show it this rank's files under
        # rank-0 names, in a temporary folder of links.
        # In the system's temp folder: the checkpoint may be read-only.
        with tempfile.TemporaryDirectory(prefix="sctd-export-") as tmp:
            view = Path(tmp) / folder.name
            view.mkdir()
            for f in folder.iterdir():
                if f.is_file() and mp in f.name:
                    (view / f.name.replace(mp, "mp_rank_00")).symlink_to(f.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=folder.name)
    return {k[len(_PREFIX):]: v.float() for k, v in state.items() if k.startswith(_PREFIX)}


def consolidate(checkpoint_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig,
                                                                        RunRecord]:
    """(Hugging Face state dict, model config, run record) of a checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or checkpoint.latest_tag(checkpoint_dir)
    if tag is None:
        raise ValueError(f"no complete checkpoint in {checkpoint_dir} (no 'latest' pointer); pass --tag")
    folder = checkpoint_dir / tag
    if not (folder / checkpoint.RUN_FILE).is_file():
        raise ValueError(f"{folder} is not a complete sctd-dist checkpoint")
    run = checkpoint.verify(checkpoint_dir, tag)  # names a missing, truncated or garbled file
    cfg = config_from_dict(run.model)
    shards = [_tp_rank_state(folder, r, run.zero_stage) for r in range(run.tensor_model_parallel_size)]
    return merge_shards(shards, cfg), cfg, run


def find_data_dir(run: RunRecord, checkpoint_dir: Path) -> Path | None:
    """The run's data folder (for its tokenizer). Older run records hold the path as given on the
    command line: a relative one is tried against the working directory, then beside the
    checkpoint folder."""
    data_path = run.data_path
    if not data_path:
        return None
    path = Path(data_path)
    tries = [path] if path.is_absolute() else [Path.cwd() / path, Path(checkpoint_dir).resolve().parent / path]
    return next((p for p in tries if p.is_dir()), None)


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty `out` unless `overwrite`; then empty it, so no file of an
    earlier export (an old pytorch_model.bin beside new safetensors) is left behind. Only a
    folder holding a model (config.json) is ever emptied."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder, or pass --overwrite to "
                         "replace the model in it")
    if not (out / "config.json").is_file():
        raise ValueError(f"--out {out} holds files but no model (no config.json); --overwrite only "
                         "replaces an exported model: choose another folder")
    shutil.rmtree(out)


def export(checkpoint_dir: Path, out: Path, tag: str | None = None, *, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder; the tokenizer comes from the run's data folder."""
    out = Path(out)
    prepare_out(out, overwrite)
    state, cfg, run = consolidate(checkpoint_dir, tag)
    tokenizer = None
    data_dir = find_data_dir(run, Path(checkpoint_dir))
    if data_dir is not None:
        from sctd_dist.data.dataset import load_tokenizer

        tokenizer = load_tokenizer(data_dir)
    elif run.data_path:
        print(f"warning: the run's data folder {run.data_path} is not found: no tokenizer written "
              f"to {out}", file=sys.stderr)
    out = save_hf(state, cfg, out, tokenizer)
    run_record.write(out / run_record.FILE, run)
    return out


@dataclass
class ExportConfig:
    """The flags of `python -m sctd_dist.export`."""

    checkpoint: Path = flag(help="the --save folder of a run")
    out: Path = flag(help="the Hugging Face folder to write")
    tag: str | None = flag(None, "checkpoint tag (default: the newest complete one)")
    overwrite: bool = flag(False, "replace the model in an existing --out folder")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sctd_dist.export", description=__doc__.split("\n\n")[1])
    add_flags(p, ExportConfig)
    a = from_flags(ExportConfig, p.parse_args(argv))
    try:
        out = export(a.checkpoint, a.out, a.tag, overwrite=a.overwrite)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = HF_CLASSES[arch_of(config_from_dict(run_record.read(out / run_record.FILE).model))]
    print(f"exported Hugging Face {model} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
