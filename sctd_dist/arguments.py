"""Command-line flags of `sctd_dist.train`, named as in Megatron-LM and DeepSpeed.

Each flag is one field of `TrainConfig` (or of its `TokenDropConfig`), declared once with its
default and help text; the parser is generated from those fields (`sctd_dist.flags`). Flag
values that can be checked alone are checked here; parsing touches no file.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sctd_dist.checkpoint import ON_BAD, complete_tags
from sctd_dist.data.mixture import DataSource, parse_data_path
from sctd_dist.flags import add_flags, flag, from_flags
from sctd_dist.lr_schedule import LRScheduleConfig
from sctd_dist.model.arch import ARCHS, attends_within_documents, hf_model_type
from sctd_dist.model.config import PRESETS, TokenDropConfig
from sctd_dist.typed import check_types

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_tiny.json"

_DATA, _PARALLEL, _DROP = "model and data", "parallelism", "token dropping"
_SCHEDULE, _OUTPUT = "schedule", "checkpoints and logs"


@dataclass
class TrainConfig:
    """One training run. Defaults reproduce the paper's ScTD settings on the tiny model."""

    deepspeed_config: Path = flag(DEFAULT_DS_CONFIG, "DeepSpeed JSON (ZeRO stage, precision, optimizer, "
                                  "batch sizes)", name="--deepspeed_config", aliases=("--deepspeed-config",),
                                  group=_DATA)
    arch: str | None = flag(None, "encoder architecture (default: bert, or the --init-hf folder's)",
                            choices=ARCHS, group=_DATA)
    model: str = flag("tiny", "model preset", choices=sorted(PRESETS), group=_DATA)
    model_config: Path | None = flag(None, "JSON of transformers.BertConfig (--arch bert) or "
                                     "ModernBertConfig (--arch modernbert) fields overriding the preset",
                                     group=_DATA)
    init_hf: Path | None = flag(None, "start from a Hugging Face BertForMaskedLM or ModernBertForMaskedLM "
                                "folder (architecture and shape from its config.json)", group=_DATA)
    attention_within_documents: bool | None = flag(
        None, "a token attends only to its own document of a packed row (default: on for "
        "modernbert, off for bert)", group=_DATA)
    data_path: list[str] | None = flag(None, "prepared shards: one folder, or a weighted blend "
                                       "`W1 DIR1 W2 DIR2 ...` (weights normalised; default: the embedded "
                                       "sample corpus)", metavar="DIR", group=_DATA)
    data_cache: Path = flag(Path("data_cache"), "where the sample corpus is built when --data-path is "
                            "not given", group=_DATA)
    seq_length: int = flag(128, "tokens per sequence (the prepared data's length)", group=_DATA)
    whole_word_masking: bool = flag(False, "mask all pieces of a word together", group=_DATA)
    mlm_probability: float = flag(0.15, "fraction of each row's tokens predicted (of those: 80%% [MASK], "
                                  "10%% random, 10%% unchanged)", group=_DATA)
    tensor_model_parallel_size: int = flag(1, "tensor-parallel size", group=_PARALLEL)
    sequence_parallel: bool = flag(False, "shard activations along the sequence between layers",
                                   group=_PARALLEL)
    activation_checkpointing: bool = flag(False, "recompute each layer in backward", group=_PARALLEL)
    compile: bool = flag(False, "torch.compile each encoder layer (fused kernels on GPUs)", group=_PARALLEL)
    dist_timeout: float = flag(900.0, "seconds a collective may wait for the other ranks before the run "
                               "stops with a line naming the step and the collective (a hung or lost "
                               "rank); long enough for a checkpoint save", group=_PARALLEL)
    token_drop: TokenDropConfig = flag(default_factory=TokenDropConfig, group=_DROP)
    train_iters: int = flag(100, "optimizer steps of the run", group=_SCHEDULE)
    lr_decay_iters: int | None = flag(None, "length of the LR schedule (default: --train-iters); a "
                                      "multi-phase run gives every phase its final step, so the phases "
                                      "continue one schedule", group=_SCHEDULE)
    schedule: LRScheduleConfig = flag(default_factory=LRScheduleConfig, group=_SCHEDULE)
    micro_batch_size: int | None = flag(None, "overrides train_micro_batch_size_per_gpu", group=_SCHEDULE)
    global_batch_size: int | None = flag(None, "overrides train_batch_size", group=_SCHEDULE)
    lr: float | None = flag(None, "overrides the optimizer's lr in the DeepSpeed JSON", group=_SCHEDULE)
    eval_interval: int = flag(50, "evaluate every N optimizer steps (and after the last)", group=_SCHEDULE)
    eval_iters: int = flag(10, "held-out micro-batches per evaluation (0: no evaluation)", group=_SCHEDULE)
    seed: int = flag(1234, "seed of the weights, dropout and data order", group=_SCHEDULE)
    save: Path | None = flag(None, "checkpoint folder", group=_OUTPUT)
    save_interval: int | None = flag(None, "checkpoint every N optimizer steps (and after the last)",
                                     group=_OUTPUT)
    load: Path | None = flag(None, "default: --save (resume from its newest checkpoint)", group=_OUTPUT)
    keep_data_position: bool = flag(False, "resuming with another --data-path or --seq-length: continue "
                                    "at the checkpoint's sample count instead of the new data's first "
                                    "sample", group=_OUTPUT)
    keep_last: int | None = flag(None, "keep only the N newest checkpoints", group=_OUTPUT)
    on_bad_checkpoint: str = flag("fallback", "when the checkpoint to resume fails to verify (a file "
                                  "missing, truncated or garbled): resume the newest one that verifies, "
                                  "or stop", choices=ON_BAD, group=_OUTPUT)
    take_over: bool = flag(False, "start even when the run lock in --save names a live run (stop that "
                           "run first: two runs writing one folder overwrite each other)", group=_OUTPUT)
    lock_stale_after: float = flag(600.0, "seconds without a refresh after which a run lock held on "
                                   "another host counts as abandoned and is taken over", group=_OUTPUT)
    log_dir: Path | None = flag(None, "metrics.jsonl and TensorBoard events", group=_OUTPUT)
    progress: bool = flag(True, "no progress bar", name="--no-progress", group=_OUTPUT)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag to change (values only: the files and folders named
        are checked at the start of the run, `sctd_dist.run.check_paths`)."""
        check_types(self)
        self.data_sources  # noqa: B018 - a malformed --data-path is a parse error
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
        for name in ("seq_length", "train_iters", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        for name in ("dist_timeout", "lock_stale_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    @property
    def data_sources(self) -> tuple[DataSource, ...] | None:
        """--data-path as (weight, folder) sources; None: the embedded sample corpus."""
        if self.data_path is None:
            return None
        paths = [self.data_path] if isinstance(self.data_path, (str, Path)) else self.data_path
        return parse_data_path(paths)

    @property
    def model_arch(self) -> str:
        """The architecture: --arch, else the --init-hf folder's, else bert."""
        if self.arch is not None:
            return self.arch
        return hf_model_type(Path(self.init_hf)) if self.init_hf is not None else "bert"

    @property
    def within_documents(self) -> bool:
        """--attention-within-documents, defaulting by architecture."""
        if self.attention_within_documents is not None:
            return self.attention_within_documents
        return attends_within_documents(self.model_arch)

    @property
    def load_dir(self) -> Path | None:
        """--load, defaulting to --save (a restart is the same command). Once --save holds a
        checkpoint of its own, a run started from another --load (a new phase, a decay branch)
        resumes from --save: rerunning its command continues it instead of starting it again."""
        if self.load is None:
            return self.save
        if self.save is not None and complete_tags(Path(self.save)):
            return self.save
        return self.load

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `TrainConfig` flag."""
    p = argparse.ArgumentParser(
        prog="sctd_dist.train",
        description="BERT pretraining with semantic-consistent token dropping on DeepSpeed.",
    )
    add_flags(p, TrainConfig)
    # The deepspeed launcher appends --local_rank; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; errors exit with the message (argparse style)."""
    parser = build_parser()
    try:
        return from_flags(TrainConfig, parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
