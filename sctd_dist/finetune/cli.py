"""`python -m sctd_dist.finetune --model DIR (--task NAME... | --train-file F --validation-file F) --out DIR`

Fine-tunes a pretrained model on downstream tasks over a grid of learning rates and seeds and
writes `results.json` and `results.md` under `--out`. Every input problem (flags, files,
columns, labels, an encoder weight that would not load) stops the run with one line and exit
code 2 before any training starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from sctd_dist.coordination import atomic_write
from sctd_dist.finetune.config import FinetuneConfig
from sctd_dist.finetune.trainer import Job
from sctd_dist.flags import add_flags, from_flags


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
        data = [load_task(name, cache, cfg.data_dir) for name in cfg.tasks]
    else:
        data = [load_local(cfg.train_file, cfg.validation_file, cfg.task_type, cache, cfg.task_name)]
    return [subsample(d, cfg.max_train_samples, cfg.max_eval_samples) for d in data]


def _json_safe(node: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers (an undefined metric is not a score)."""
    if isinstance(node, dict):
        return {k: _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    return None if isinstance(node, float) and not math.isfinite(node) else node


def _prepare_jobs(cfg: FinetuneConfig, tasks: list, source, work: Path, copy_b: bool):
    """Tokenised features and one job per task, learning rate and seed; the task model of each task
    is loaded and checked first (any unloaded weight stops the run here)."""
    from sctd_dist.finetune.features import read_split, write_features
    from sctd_dist.finetune.metrics import majority_accuracy
    from sctd_dist.finetune.weights import load_task_model, model_tokenizer

    config = json.loads((source.folder / "config.json").read_text())
    cfg.check_positions(int(config.get("max_position_embeddings", 512)), {d.spec.kind for d in tasks})
    tokenizer = model_tokenizer(source, cfg.tokenizer, config["vocab_size"])
    jobs: list[Job] = []
    info: dict[str, dict[str, Any]] = {}
    for data in tasks:
        spec = data.spec
        _, fresh = load_task_model(source, spec.kind, data.num_labels)
        features = write_features(data, tokenizer, work / spec.name, cfg)
        info[spec.name] = {"kind": spec.kind, "metrics": list(spec.metrics), "source": data.source,
                           "train_rows": len(data.train), "eval_rows": {s: len(d) for s, d in data.evals.items()},
                           "fresh_weights": fresh}
        if spec.kind == "qa":  # windows per split: more than the questions when contexts are long
            info[spec.name]["eval_windows"] = {s: len(read_split(features, f"eval-{s}")) for s in data.evals}
        if spec.kind == "classification":
            info[spec.name]["labels"] = [str(v) for v in data.labels or []]
            info[spec.name]["majority_class_accuracy"] = {
                s: majority_accuracy(data.train["label"], d["label"]) for s, d in data.evals.items()}
        jobs += [Job(spec.name, spec.kind, data.num_labels, spec.metrics, tuple(data.evals),
                     spec.version_2_with_negative, features, source, lr, seed, cfg.settings,
                     tokenizer=cfg.tokenizer, copy_segment_b=copy_b)
                 for lr in cfg.learning_rates for seed in cfg.seeds]
    return jobs, info


def _warnings(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task whose chosen learning rate has runs that predicted a single class."""
    from sctd_dist.finetune.summary import collapsed_runs

    lines = []
    for name, t in tasks.items():
        collapsed = collapsed_runs(t["runs"], t["best_lr"])
        if collapsed:
            one = "value" if t["kind"] == "regression" else "class"
            lines.append(f"{name}: {len(collapsed)} run(s) at lr {t['best_lr']:g} predicted one {one} for every "
                         f"example (a model that learnt nothing); train longer (--min-steps, --num-train-epochs) "
                         "or add larger --learning-rates")
    return lines


def _glue_line(tasks: dict[str, dict[str, Any]]) -> tuple[dict[str, float] | None, list[str]]:
    from sctd_dist.finetune.metrics import glue_score

    medians = {name: {split: {m: s["median"] for m, s in per.items()} for split, per in t["results"].items()}
               for name, t in tasks.items()}
    score = glue_score(medians)
    if score is None:
        return None, []
    parts = ", ".join(f"{k} {v:.1f}" for k, v in score.items() if k != "glue")
    return score, [f"GLUE score (dev sets, the leaderboard's average of the nine tasks' scores): "
                   f"{score['glue']:.1f} ({parts})"]


def run(cfg: FinetuneConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate everything, fine-tune the grid, write results.json / results.md; returns the results."""
    from sctd_dist.finetune.segments import decide
    from sctd_dist.finetune.summary import markdown, summarize_task
    from sctd_dist.finetune.weights import check_model, checkpoint_state_dict, resolve_model

    started = time.perf_counter()
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    check_model(cfg.model, cfg.tag)
    tasks = _load_data(cfg)  # every file and column problem surfaces here, before the model loads
    devices = _devices(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".work-", dir=cfg.out) as work, \
            resolve_model(cfg.model, cfg.tag, Path(work)) as source:
        segment_b = decide(source.folder, checkpoint_state_dict(source.folder), cfg.segment_b)
        jobs, info = _prepare_jobs(cfg, tasks, source, Path(work), segment_b.copy)
        print(segment_b.describe(), file=sys.stderr)
        runs = run_jobs(jobs, devices, cfg.threads, cfg.progress)
        model_info = {**source.to_dict(), "segment_b": segment_b.to_dict()}
    results: dict[str, Any] = {
        "model": model_info, "command": list(argv) if argv is not None else sys.argv[1:],
        "config": _json_safe({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}),
        "devices": devices, "tasks": {}, "wall_s": None}
    for name, meta in info.items():
        task_runs = [r for r in runs if r["task"] == name]
        results["tasks"][name] = {**meta, **summarize_task(task_runs, meta["metrics"]), "runs": task_runs}
    results["warnings"] = _warnings(results["tasks"])
    results["glue_score"], glue = _glue_line(results["tasks"])
    results["wall_s"] = round(time.perf_counter() - started, 2)
    table = markdown(results["tasks"])
    results["table"] = table
    md = [f"# Fine-tuning results: {model_info['model']}", "",
          f"Median and range over seeds {cfg.seeds} at the best of learning rates "
          f"{[f'{lr:g}' for lr in cfg.learning_rates]} (by the median of the task's metrics).", "", table]
    md += ["", *glue] if glue else []
    md += ["", *(f"- warning: {w}" for w in results["warnings"])] if results["warnings"] else []
    atomic_write(cfg.out / "results.json", json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    atomic_write(cfg.out / "results.md", "\n".join(md) + "\n")
    return results


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The parser of every `FinetuneConfig` flag."""
    from sctd_dist.finetune import config

    p = argparse.ArgumentParser(prog="python -m sctd_dist.finetune", description=__doc__.split("\n\n")[1],
                                epilog=" ".join(config.__doc__.split()))
    add_flags(p, FinetuneConfig)
    return p


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    """Parse and validate; a bad value exits 2 with one line naming the flag."""
    parser = build_parser()
    try:
        return from_flags(FinetuneConfig, parser.parse_args(argv))
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
        raise  # unreachable


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 on success, 2 with one line on stderr for any input problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    namespace = build_parser().parse_args(argv)  # argparse's own errors exit 2 with the usage
    try:
        cfg = from_flags(FinetuneConfig, namespace)
        results = run(cfg, argv)
    except ValueError as exc:  # input problems: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results["table"])
    for line in results["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {cfg.out / 'results.json'} and {cfg.out / 'results.md'}")
    return 0
