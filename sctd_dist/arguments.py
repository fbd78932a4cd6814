"""Command-line flags of `sctd_dist.train`, named as in Megatron-LM and DeepSpeed.

The flags become one typed, validated `TrainConfig`; everything that can be checked before any
process group exists is checked here, so a bad flag costs seconds, not a queue slot.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sctd_dist.model.config import PRESETS, TokenDropConfig

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_tiny.json"


@dataclass
class TrainConfig:
    """One training run. Defaults reproduce the paper's ScTD settings on the tiny model."""

    deepspeed_config: Path = DEFAULT_DS_CONFIG
    model: str = "tiny"
    model_config: Path | None = None
    data_path: Path | None = None  # None: build and cache the embedded sample corpus
    data_cache: Path = Path("data_cache")
    seq_length: int = 128
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    token_drop: TokenDropConfig = None  # type: ignore[assignment]
    train_iters: int = 100
    lr_decay_iters: int | None = None  # None: --train-iters
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    eval_interval: int = 50
    eval_iters: int = 10
    save: Path | None = None
    save_interval: int | None = None
    load: Path | None = None
    keep_last: int | None = None
    log_dir: Path | None = None
    seed: int = 1234
    activation_checkpointing: bool = False
    compile: bool = False
    init_hf: Path | None = None
    lr: float | None = None
    whole_word_masking: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.token_drop is None:
            self.token_drop = TokenDropConfig()
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag to change."""
        if not Path(self.deepspeed_config).is_file():
            raise ValueError(
                f"--deepspeed_config {self.deepspeed_config} does not exist; pick one of "
                f"{sorted(p.name for p in DEFAULT_DS_CONFIG.parent.glob('*.json'))} in ds_configs/"
            )
        if self.model not in PRESETS:
            raise ValueError(f"--model must be one of {sorted(PRESETS)}, got {self.model!r}")
        if self.model_config is not None and not Path(self.model_config).is_file():
            raise ValueError(f"--model-config {self.model_config} does not exist")
        if self.data_path is not None and not Path(self.data_path).is_dir():
            raise ValueError(
                f"--data-path {self.data_path} is not a directory; prepare one with "
                "`python -m sctd_dist.data.prepare ... --out DIR`, or omit the flag to use the "
                "embedded sample corpus"
            )
        if self.init_hf is not None and not Path(self.init_hf).is_dir():
            raise ValueError(f"--init-hf {self.init_hf} is not a Hugging Face model folder")
        for name in ("seq_length", "train_iters", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ValueError(f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}")
        if self.eval_iters < 0:
            raise ValueError(f"--eval-iters must be >= 0, got {self.eval_iters}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    @property
    def load_dir(self) -> Path | None:
        """--load, defaulting to --save (a restart is the same command)."""
        return self.load if self.load is not None else self.save

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sctd_dist.train",
        description="BERT pretraining with semantic-consistent token dropping on DeepSpeed.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", type=Path,
                   default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON (ZeRO stage, precision, optimizer)")
    g.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    g.add_argument("--model-config", type=Path, help="JSON of transformers.BertConfig fields overriding the preset")
    g.add_argument("--init-hf", type=Path, help="start from a Hugging Face BertForMaskedLM folder")
    g.add_argument("--data-path", type=Path, help="prepared shards (default: the embedded sample corpus)")
    g.add_argument("--data-cache", type=Path, default=Path("data_cache"),
                   help="where the sample corpus is built when --data-path is not given")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--whole-word-masking", action="store_true")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each encoder layer (fused kernels on GPUs)")
    g = p.add_argument_group("token dropping")
    g.add_argument("--token-drop", choices=["none", "vanilla", "sctd"], default="sctd")
    g.add_argument("--token-keep-ratio", type=float, default=0.5)
    g.add_argument("--token-drop-split-layer", type=int, help="default: num_layers/2 - 1")
    g.add_argument("--sctd-interval", type=int, default=10)
    g.add_argument("--sctd-weight", type=float, default=0.05)
    g.add_argument("--sctd-full-mlm-weight", type=float, default=0.0,
                   help="weight of the full-token pass's own MLM loss on ScTD steps")
    g.add_argument("--importance-beta", type=float, default=0.95)
    g = p.add_argument_group("schedule")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr-decay-iters", type=int,
                   help="length of the LR schedule (default: --train-iters); a multi-phase run gives "
                        "every phase its final step, so the phases continue one schedule")
    g.add_argument("--micro-batch-size", type=int, help="overrides train_micro_batch_size_per_gpu")
    g.add_argument("--global-batch-size", type=int, help="overrides train_batch_size")
    g.add_argument("--lr", type=float, help="overrides the optimizer's lr in the DeepSpeed JSON")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save", type=Path)
    g.add_argument("--save-interval", type=int)
    g.add_argument("--load", type=Path, help="default: --save (resume from its newest checkpoint)")
    g.add_argument("--keep-last", type=int, help="keep only the N newest checkpoints")
    g.add_argument("--log-dir", type=Path)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    # The deepspeed launcher appends --local_rank; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; errors exit with the message (argparse style)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        drop = TokenDropConfig(
            mode=a.token_drop, keep_ratio=a.token_keep_ratio, split_layer=a.token_drop_split_layer,
            sctd_interval=a.sctd_interval, sctd_weight=a.sctd_weight,
            full_mlm_weight=a.sctd_full_mlm_weight, importance_beta=a.importance_beta,
        )
        return TrainConfig(
            deepspeed_config=a.deepspeed_config, model=a.model, model_config=a.model_config,
            data_path=a.data_path, data_cache=a.data_cache, seq_length=a.seq_length,
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            sequence_parallel=a.sequence_parallel, token_drop=drop, train_iters=a.train_iters,
            lr_decay_iters=a.lr_decay_iters,
            micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
            eval_interval=a.eval_interval, eval_iters=a.eval_iters, save=a.save,
            save_interval=a.save_interval, load=a.load, keep_last=a.keep_last, log_dir=a.log_dir,
            seed=a.seed,
            activation_checkpointing=a.activation_checkpointing, compile=a.compile, init_hf=a.init_hf,
            lr=a.lr,
            whole_word_masking=a.whole_word_masking, progress=a.progress,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
