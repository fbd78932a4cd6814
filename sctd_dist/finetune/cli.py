"""`python -m sctd_dist.finetune --model DIR (--task NAME... | --train-file F --validation-file F) --out DIR`

Fine-tunes a pretrained model on downstream tasks over a grid of learning rates and seeds and
writes `results.json` and `results.md` under `--out`. Every input problem (flags, files,
columns, labels, an encoder weight that would not load) stops the run with one line and exit
code 2 before any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sctd_dist.coordination import atomic_write
from sctd_dist.finetune.tasks import KINDS, NAMED_TASKS, OFFLINE_TASKS
from sctd_dist.finetune.trainer import Job, TrainSettings

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
ALIASES = {"glue": GLUE, "offline": OFFLINE_TASKS}


@dataclass
class FinetuneConfig:
    """One fine-tuning run: a model, its tasks and the grid."""

    model: Path
    out: Path
    tasks: list[str] = field(default_factory=list)
    train_file: Path | None = None
    validation_file: Path | None = None
    task_type: str | None = None  # local files: None = infer
    task_name: str | None = None
    tag: str | None = None
    tokenizer: Path | None = None
    learning_rates: list[float] = field(default_factory=lambda: [2e-5, 3e-5, 5e-5])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    settings: TrainSettings = field(default_factory=TrainSettings)
    max_seq_length: int = 128
    doc_stride: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    device: str = "cpu"
    workers: int | None = None  # None: one per visible GPU, else 1
    threads: int | None = None
    cache_dir: Path | None = None
    progress: bool = True

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
        if self.task_type is not None and not local:
            raise ValueError("--task-type is for --train-file/--validation-file (named tasks know their type)")
        if self.task_type not in (None, *KINDS):
            raise ValueError(f"--task-type must be one of {list(KINDS)}")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"--learning-rates must be positive, got {self.learning_rates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct, got {self.seeds}")
        s = self.settings
        if s.epochs <= 0 and not s.max_steps:
            raise ValueError("--num-train-epochs must be > 0 (or give --max-steps)")
        for flag, value in (("--max-steps", s.max_steps), ("--max-train-samples", self.max_train_samples),
                            ("--max-eval-samples", self.max_eval_samples), ("--workers", self.workers),
                            ("--threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if s.batch_size < 1 or s.eval_batch_size < 1:
            raise ValueError("--per-device-train-batch-size and --per-device-eval-batch-size must be >= 1")
        if not 0.0 <= s.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}")
        if self.max_seq_length < 8 or not 0 < self.doc_stride:
            raise ValueError("--max-seq-length must be >= 8 and --doc-stride > 0")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda asked for, but no CUDA device is visible")
        if not Path(self.model).exists():
            raise ValueError(f"--model {self.model} does not exist")


def _devices(cfg: FinetuneConfig) -> list[str]:
    """One device string per worker process."""
    if cfg.device.startswith("cuda"):
        import torch

        if cfg.device != "cuda":  # one named GPU: one worker unless asked otherwise
            return [cfg.device] * (cfg.workers or 1)
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(cfg.workers or count)]
    return ["cpu"] * (cfg.workers or 1)


# ----------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _init_worker(devices, threads: int | None) -> None:
    import torch

    _WORKER["device"] = devices.get()
    if threads:
        torch.set_num_threads(threads)


def _run_in_worker(job: Job) -> dict[str, Any]:
    from sctd_dist.finetune.trainer import run_job

    return run_job(job, _WORKER["device"], progress=False)


def run_jobs(jobs: list[Job], devices: list[str], threads: int | None, progress: bool) -> list[dict[str, Any]]:
    """Run every job, spread over one process per device (in this process when there is one)."""
    from tqdm.auto import tqdm

    from sctd_dist.finetune.trainer import run_job

    if len(devices) == 1:
        import torch

        if threads:
            torch.set_num_threads(threads)
        results = []
        for job in tqdm(jobs, desc="fine-tuning runs", disable=not progress):
            results.append(run_job(job, devices[0], progress=progress))
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # CUDA and torch threads do not survive fork
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, threads)) as pool:
        futures = [pool.submit(_run_in_worker, job) for job in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="fine-tuning runs", disable=not progress):
            results.append(fut.result())
    return sorted(results, key=lambda r: (r["task"], r["lr"], r["seed"]))


# ----------------------------------------------------------------------------- the run

def _load_data(cfg: FinetuneConfig) -> list:
    from sctd_dist.finetune.tasks import load_local, load_task, subsample

    cache = str(cfg.cache_dir) if cfg.cache_dir else None
    if cfg.tasks:
        data = [load_task(name, cache) for name in cfg.tasks]
    else:
        data = [load_local(cfg.train_file, cfg.validation_file, cfg.task_type, cache, cfg.task_name)]
    return [subsample(d, cfg.max_train_samples, cfg.max_eval_samples) for d in data]


def run(cfg: FinetuneConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate everything, fine-tune the grid, write results.json / results.md; returns the results."""
    from sctd_dist.finetune.features import write_features
    from sctd_dist.finetune.metrics import majority_accuracy
    from sctd_dist.finetune.summary import markdown, summarize_task
    from sctd_dist.finetune.weights import load_task_model, load_tokenizer, resolve_model

    started = time.perf_counter()
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    tasks = _load_data(cfg)  # every file and column problem surfaces here, before the model loads
    devices = _devices(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=cfg.out) as work, \
            resolve_model(cfg.model, cfg.tag, Path(work)) as source:
        config = json.loads((source.folder / "config.json").read_text())
        tokenizer = load_tokenizer(source, cfg.tokenizer, config["vocab_size"])
        jobs: list[Job] = []
        info: dict[str, dict[str, Any]] = {}
        for data in tasks:
            spec = data.spec
            _, fresh = load_task_model(source, spec.kind, data.num_labels)  # fails on any unloaded weight
            features = write_features(data, tokenizer, Path(work) / spec.name, cfg.max_seq_length, cfg.doc_stride)
            info[spec.name] = {"kind": spec.kind, "metrics": list(spec.metrics), "source": data.source,
                               "train_rows": len(data.train),
                               "eval_rows": {s: len(d) for s, d in data.evals.items()},
                               "fresh_weights": fresh}
            if spec.kind == "classification":
                info[spec.name]["labels"] = [str(v) for v in data.labels or []]
                info[spec.name]["majority_class_accuracy"] = {
                    s: majority_accuracy(data.train["label"], d["label"]) for s, d in data.evals.items()}
            jobs += [Job(spec.name, spec.kind, data.num_labels, spec.metrics, tuple(data.evals),
                         spec.version_2_with_negative, features, source, lr, seed, cfg.settings)
                     for lr in cfg.learning_rates for seed in cfg.seeds]
        runs = run_jobs(jobs, devices, cfg.threads, cfg.progress)
        model_info = source.to_dict()
    results: dict[str, Any] = {
        "model": model_info, "command": list(argv) if argv is not None else sys.argv[1:],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "devices": devices, "tasks": {}, "wall_s": None}
    notes = []
    for name, meta in info.items():
        task_runs = [r for r in runs if r["task"] == name]
        results["tasks"][name] = {**meta, **summarize_task(task_runs, meta["metrics"]), "runs": task_runs}
        single = [r for r in task_runs for e in r["eval"].values()
                  if len(e.get("predicted_class_counts", {0: 0, 1: 0})) == 1]
        if single:
            notes.append(f"- {name}: {len(single)} run(s) predicted one class for every example "
                         "(a model that learnt nothing scores the majority class)")
    results["wall_s"] = round(time.perf_counter() - started, 2)
    table = markdown(results["tasks"])
    results["table"] = table
    md = [f"# Fine-tuning results: {model_info['model']}", "",
          f"Median and range over seeds {cfg.seeds} at the best of learning rates "
          f"{[f'{lr:g}' for lr in cfg.learning_rates]} (by the median of the task's metrics).", "", table]
    if notes:
        md += ["", *notes]
    atomic_write(cfg.out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(cfg.out / "results.md", "\n".join(md) + "\n")
    return results


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sctd_dist.finetune", description=__doc__.split("\n\n")[1])
    g = p.add_argument_group("model and tasks")
    g.add_argument("--model", type=Path, required=True,
                   help="an exported Hugging Face folder, or a checkpoint folder (--save of a run; "
                        "exported on the fly)")
    g.add_argument("--tag", help="checkpoint tag when --model is a checkpoint folder (default: the newest)")
    g.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the model folder's)")
    g.add_argument("--task", nargs="+", default=[], metavar="NAME",
                   help=f"named tasks: {', '.join(sorted(NAMED_TASKS))}; 'glue' = all GLUE tasks, "
                        "'offline' = the offline suite")
    g.add_argument("--train-file", type=Path, help="csv/tsv/jsonl (sentence1 [sentence2] label) or SQuAD json")
    g.add_argument("--validation-file", type=Path)
    g.add_argument("--task-type", choices=KINDS, help="local files: default inferred (SQuAD json: qa; float "
                                                      "labels: regression; else classification)")
    g.add_argument("--task-name", help="name of a local-file task in the results (default: the file's folder)")
    g.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    g = p.add_argument_group("protocol")
    g.add_argument("--learning-rates", type=float, nargs="+", default=[2e-5, 3e-5, 5e-5])
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    g.add_argument("--num-train-epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=int, help="optimizer steps per run (overrides --num-train-epochs)")
    g.add_argument("--per-device-train-batch-size", type=int, default=32)
    g.add_argument("--per-device-eval-batch-size", type=int, default=64)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--max-seq-length", type=int, default=128)
    g.add_argument("--doc-stride", type=int, default=128, help="QA: overlap of the windows of a long context")
    g.add_argument("--max-answer-length", type=int, default=30)
    g.add_argument("--n-best-size", type=int, default=20)
    g.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="SQuAD v2: answer nothing when the no-answer score beats the best span by more")
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu, cuda (every visible GPU) or cuda:N")
    g.add_argument("--workers", type=int, help="processes running jobs (default: one per GPU, 1 on CPU)")
    g.add_argument("--threads", type=int, help="torch threads per worker")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    g.add_argument("--cache-dir", type=Path, help="datasets cache (default: Hugging Face's)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        settings = TrainSettings(epochs=a.num_train_epochs, max_steps=a.max_steps,
                                 batch_size=a.per_device_train_batch_size,
                                 eval_batch_size=a.per_device_eval_batch_size, weight_decay=a.weight_decay,
                                 warmup_ratio=a.warmup_ratio, n_best=a.n_best_size,
                                 max_answer_length=a.max_answer_length,
                                 null_score_diff_threshold=a.null_score_diff_threshold, bf16=a.bf16)
        return FinetuneConfig(
            model=a.model, out=a.out, tasks=a.task, train_file=a.train_file, validation_file=a.validation_file,
            task_type=a.task_type, task_name=a.task_name, tag=a.tag, tokenizer=a.tokenizer,
            learning_rates=a.learning_rates, seeds=a.seeds, settings=settings, max_seq_length=a.max_seq_length,
            doc_stride=a.doc_stride, max_train_samples=a.max_train_samples, max_eval_samples=a.max_eval_samples,
            device=a.device, workers=a.workers, threads=a.threads, cache_dir=a.cache_dir, progress=a.progress)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
        raise  # unreachable


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    try:
        results = run(cfg, argv)
    except ValueError as exc:  # input problems: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results["table"])
    print(f"wrote {cfg.out / 'results.json'} and {cfg.out / 'results.md'}")
    return 0
