"""The settings of a fine-tuning run, each declared once as a flag (`sctd_dist.flags`).

The protocol's defaults are meant to learn on small models and small datasets too: the grid joins
BERT's learning rates (2e-5, 3e-5, 5e-5) with those recommended for the small BERTs of Turc et
al. 2019 (1e-4, 3e-4), and every run takes at least `--min-steps` optimizer steps (3 epochs of a
625-row task at batch 32 are only 60 steps, which leaves a small model predicting one class).
Question answering has its own window (`--qa-max-seq-length` 384, `--doc-stride` 128,
`--max-query-length` 64, as in BERT's reference run_squad), independent of the classification
length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from sctd_dist.finetune.tasks import ALIASES, KINDS, NAMED_TASKS
from sctd_dist.flags import flag

GRID = [2e-5, 3e-5, 5e-5, 1e-4, 3e-4]
SPECIAL_TOKENS_IN_A_PAIR = 3  # [CLS] question [SEP] context [SEP]

# One argparse group per section of --help.
_task = partial(flag, group="model and tasks")
_protocol = partial(flag, group="protocol")
_execution = partial(flag, group="execution")


@dataclass
class TrainSettings:
    """Hyper-parameters shared by every job of a run (the grid varies lr and seed)."""

    epochs: float = _protocol(3.0, "epochs per run", name="--num-train-epochs")
    max_steps: int | None = _protocol(None, "optimizer steps per run (overrides --num-train-epochs and --min-steps)")
    min_steps: int = _protocol(300, "at least this many optimizer steps per run, however small the dataset (0: none)")
    batch_size: int = _protocol(32, "training batch size", name="--per-device-train-batch-size")
    eval_batch_size: int = _protocol(64, "evaluation batch size", name="--per-device-eval-batch-size")
    weight_decay: float = _protocol(0.01, "AdamW weight decay (none on biases and LayerNorm)")
    warmup_ratio: float = _protocol(0.1, "fraction of the steps with a linear warmup (then linear decay)")
    max_grad_norm: float = _protocol(1.0, "gradient clipping")
    n_best: int = _protocol(20, "QA: best starts and ends tried per window", name="--n-best-size")
    max_answer_length: int = _protocol(30, "QA: longest answer in tokens")
    null_score_diff_threshold: float = _protocol(0.0, "SQuAD v2: answer nothing when the no-answer score beats "
                                                 "the best span by more (the best value on the dev set is "
                                                 "reported too)")
    bf16: bool = _execution(False, "bf16 autocast (GPUs)")

    def steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of one run over a dataset of `batches_per_epoch` batches."""
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch), self.min_steps)

    def validate(self) -> None:
        """Raise ValueError naming the flag to change."""
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("--num-train-epochs must be > 0 (or give --max-steps)")
        for name, value in (("--max-steps", self.max_steps), ("--per-device-train-batch-size", self.batch_size),
                            ("--per-device-eval-batch-size", self.eval_batch_size),
                            ("--n-best-size", self.n_best), ("--max-answer-length", self.max_answer_length)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_steps < 0:
            raise ValueError(f"--min-steps must be >= 0, got {self.min_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class FinetuneConfig:
    """One fine-tuning run: a model, its tasks and the grid."""

    model: Path = _task(help="an exported Hugging Face folder, or a checkpoint folder (--save of a run; "
                            "exported on the fly)")
    out: Path = _task(help="folder for results.json and results.md")
    tasks: list[str] = _task(help=f"named tasks: {', '.join(sorted(NAMED_TASKS))}; 'glue' = the nine GLUE "
                                 "tasks, 'offline' = the offline suite", name="--task", metavar="NAME",
                            default_factory=list)
    data_dir: Path | None = _task(None, "read named tasks from the official files here (DIR/CoLA ... DIR/WNLI "
                                       "as GLUE unpacks; DIR/train-v1.1.json, dev-v1.1.json, *-v2.0.json); "
                                       "without it they come from the Hugging Face hub")
    train_file: Path | None = _task(None, "csv/tsv/jsonl (sentence1 [sentence2] label) or SQuAD json")
    validation_file: Path | None = _task(None, "its validation file")
    task_type: str | None = _task(None, "local files: default inferred (SQuAD json: qa; float labels: "
                                       "regression; else classification)", choices=KINDS)
    task_name: str | None = _task(None, "name of a local-file task in the results (default: the file's folder)")
    tag: str | None = _task(None, "checkpoint tag when --model is a checkpoint folder (default: the newest)")
    tokenizer: Path | None = _task(None, "tokenizer folder (default: the model folder's)")
    segment_b: Literal["auto", "copy", "keep"] = _task(
        "auto", "pair tasks' segment B (token type 1) embedding: copy segment A's when pretraining never "
                "trained it (auto: from the run record, else by detecting an untrained row), always, or keep it")
    learning_rates: list[float] = _protocol(help="the learning-rate grid: BERT's and the small BERTs' (Turc et "
                                            "al. 2019)", default_factory=lambda: list(GRID))
    seeds: list[int] = _protocol(help="seeds per learning rate", default_factory=lambda: [1, 2, 3])
    settings: TrainSettings = _protocol(help="", default_factory=TrainSettings)
    max_seq_length: int = _protocol(128, "classification and regression: tokens per example")
    qa_max_seq_length: int = _protocol(384, "QA: tokens per window (question and context)")
    doc_stride: int = _protocol(128, "QA: tokens of overlap between the windows of a long context")
    max_query_length: int = _protocol(64, "QA: questions are cut to this many tokens")
    max_train_samples: int | None = _protocol(None, "first N rows of the training split")
    max_eval_samples: int | None = _protocol(None, "first N rows of each evaluation split")
    device: str = _execution("cpu", "cpu, cuda (every visible GPU) or cuda:N")
    workers: int | None = _execution(None, "processes running jobs (default: one per GPU, 1 on CPU)")
    threads: int | None = _execution(None, "torch threads per worker")
    cache_dir: Path | None = _execution(None, "datasets cache (default: Hugging Face's)")
    progress: bool = _execution(True, "no progress bars", name="--no-progress")

    def __post_init__(self) -> None:
        self.tasks = [t for name in self.tasks for t in ALIASES.get(name, (name,))]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag to change."""
        local = self.train_file is not None or self.validation_file is not None
        if bool(self.tasks) == local:
            raise ValueError("give either --task NAME or --train-file F --validation-file F")
        if local and (self.train_file is None or self.validation_file is None):
            raise ValueError("--train-file and --validation-file go together")
        unknown = [t for t in self.tasks if t not in NAMED_TASKS]
        if unknown:
            raise ValueError(f"unknown --task {unknown}; choose from {sorted(NAMED_TASKS)} or "
                             f"{sorted(ALIASES)}, or pass --train-file/--validation-file")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"--data-dir {self.data_dir} is not a folder")
        if self.task_type is not None and not local:
            raise ValueError("--task-type is for --train-file/--validation-file (named tasks know their type)")
        if self.task_type not in (None, *KINDS):
            raise ValueError(f"--task-type must be one of {list(KINDS)}")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"--learning-rates must be positive, got {self.learning_rates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct, got {self.seeds}")
        self.settings.validate()
        for name, value in (("--max-train-samples", self.max_train_samples),
                            ("--max-eval-samples", self.max_eval_samples), ("--workers", self.workers),
                            ("--threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._validate_lengths()
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda asked for, but no CUDA device is visible")
        if not Path(self.model).exists():
            raise ValueError(f"--model {self.model} does not exist")

    def _validate_lengths(self) -> None:
        """The window combinations a fast tokenizer would refuse (or panic on) mid-run."""
        if self.max_seq_length < 8:
            raise ValueError(f"--max-seq-length must be >= 8, got {self.max_seq_length}")
        if self.max_query_length < 1 or self.doc_stride < 1:
            raise ValueError("--max-query-length and --doc-stride must be >= 1")
        room = self.qa_max_seq_length - self.max_query_length - SPECIAL_TOKENS_IN_A_PAIR
        if room < 1:
            raise ValueError(f"--qa-max-seq-length {self.qa_max_seq_length} leaves no room for the context after "
                             f"a question of --max-query-length {self.max_query_length}; raise the first or "
                             "lower the second")
        if self.doc_stride >= room:
            raise ValueError(f"--doc-stride {self.doc_stride} must be below the context room of a window, "
                             f"{room} (--qa-max-seq-length {self.qa_max_seq_length} - --max-query-length "
                             f"{self.max_query_length} - {SPECIAL_TOKENS_IN_A_PAIR} special tokens); lower "
                             "--doc-stride")

    def check_positions(self, max_position_embeddings: int, kinds: set[str]) -> None:
        """Raise ValueError when a window is longer than the model's position embeddings."""
        for kind_set, name, value in (({"classification", "regression"}, "--max-seq-length", self.max_seq_length),
                                      ({"qa"}, "--qa-max-seq-length", self.qa_max_seq_length)):
            if kinds & kind_set and value > max_position_embeddings:
                raise ValueError(f"{name} {value} exceeds the model's max_position_embeddings "
                                 f"{max_position_embeddings}; lower {name}")
