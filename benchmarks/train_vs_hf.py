"""Training throughput through `sctd_dist/train.py` against transformers' BertForMaskedLM under
the same DeepSpeed engine settings, shape, batch, data pipeline, threads and allocator.

Arms (each a real training run under torchrun, `train_runs.run_training`):
  ours_none   train.py --token-drop none   (plain MLM; logits at the masked positions only)
  ours_sctd   train.py --token-drop sctd   (token dropping + the consistency step every 10th)
  hf          hf_train.py: transformers.BertForMaskedLM in train.py's loop (logits everywhere)

The arms run one after the other, in an order rotated every round, so load from other processes
on a shared machine hits them alike. Each run's steps after the warmup are cut into whole ScTD
intervals of 10 steps (so a consistency step weighs what it weighs in training); an interval's
tokens/s is its tokens over its time, as the run's own metrics.jsonl records them, and an arm's
number is the median over all its intervals of all rounds: a burst of load from another process
spoils one interval, not the result. Goals: ours_none >= 1.3x and ours_sctd >= 1.6x the tokens/s
of hf.

    .venv/bin/python benchmarks/train_vs_hf.py            # tiny model, seq 128, 3 rounds, ~6 min
    .venv/bin/python benchmarks/train_vs_hf.py --quick    # 1 round of short runs
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_runs import HF_TRAIN_PY, TRAIN_PY, run_training, summarize  # noqa: E402

import torch  # noqa: E402

ARMS = {"ours_none": (TRAIN_PY, ["--token-drop", "none"]),
        "ours_sctd": (TRAIN_PY, ["--token-drop", "sctd"]),
        "hf": (HF_TRAIN_PY, [])}
GOALS = {"ours_none": 1.3, "ours_sctd": 1.6}


def interval_rates(records: list[dict[str, Any]], interval: int = 10) -> list[float]:
    """tokens/s of each whole interval of `interval` step records."""
    out = []
    for i in range(0, len(records) - interval + 1, interval):
        chunk = records[i:i + interval]
        tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in chunk)
        out.append(tokens / sum(r["step_time_s"] for r in chunk))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("bert", "modernbert"), default="bert",
                   help="encoder (modernbert: against transformers' ModernBertForMaskedLM)")
    p.add_argument("--model", default="tiny", help="model preset (vocabulary: the sample tokenizer's)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--ds-config", type=Path, default=common.REPO_ROOT / "ds_configs" / "cpu_tiny.json")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out (ScTD: whole intervals)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the one rank")
    p.add_argument("--quick", action="store_true", help="1 round of 30 steps")
    p.add_argument("--work-dir", type=Path, default=common.REPO_ROOT / "runs" / "train_vs_hf")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "train_vs_hf.json")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.train_iters = 1, 30
    if (args.train_iters - args.warmup) % 10 or args.warmup % 10:
        p.error("--warmup and --train-iters minus --warmup must be multiples of 10 (ScTD intervals)")
    return args


def main(argv: list[str] | None = None) -> int:
    common.use_tuned_allocator()  # this process prepares the data; the runs get it anyway
    args = parse_args(argv)
    env = common.environment(argparse.Namespace(quick=args.quick), torch.device("cpu"))
    cache = args.work_dir / "data_cache"
    from sctd_dist.data.sample_cache import ensure_sample_dataset

    ensure_sample_dataset(cache, seq_length=args.seq_length)
    base = ["--deepspeed_config", str(args.ds_config), "--arch", args.arch, "--model", args.model,
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch),
            "--global-batch-size", str(args.global_batch), "--train-iters", str(args.train_iters),
            "--eval-iters", "0", "--data-cache", str(cache)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for name in common.rotate(list(ARMS), r):
            script, extra = ARMS[name]
            log_dir = args.work_dir / f"{name}-r{r}"
            shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl is appended to
            records = run_training([*base, *extra], 1, log_dir, threads_per_rank=args.threads,
                                   script=script, timeout=1800)
            stats = summarize(records, warmup=args.warmup)
            stats["interval_tokens_per_s"] = interval_rates(records[args.warmup:])
            runs[name].append(stats)
            print(f"round {r} {name:9s} {stats['tokens_per_s']:8.0f} tokens/s (intervals: "
                  f"{', '.join(f'{x:.0f}' for x in stats['interval_tokens_per_s'])})", flush=True)
    tokens = {name: common.median(x for s in runs[name] for x in s["interval_tokens_per_s"])
              for name in ARMS}
    ratios = {name: tokens[name] / tokens["hf"] for name in GOALS}
    per_round = {name: [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[name], runs["hf"])]
                 for name in GOALS}
    goals = [{"goal": f"{name} tokens/s >= {g}x transformers", "value": ratios[name],
              "pass": ratios[name] >= g} for name, g in GOALS.items()]
    table = common.markdown_table(
        ["arm", "tokens/s (median interval)", "vs transformers", "per round (whole runs)", "goal"],
        [[name, f"{tokens[name]:,.0f}", f"{tokens[name] / tokens['hf']:.2f}x",
          " ".join(f"{x:.2f}" for x in per_round.get(name, [])) or "-",
          f">= {GOALS[name]}x" if name in GOALS else "-"] for name in ARMS])
    payload = {
        "benchmark": "train_vs_hf", "environment": env,
        "settings": {**common.plain_settings(args),
                     "ranks": 1, "train_args": base},
        "runs": runs, "tokens_per_s": tokens, "ratio_vs_hf": ratios, "ratio_per_round": per_round,
        "goals": goals, "table": table, "wall_s": time.perf_counter() - t0,
    }
    print()
    print(table)
    for g in goals:
        print(f"{'PASS' if g['pass'] else 'FAIL'}  {g['goal']} ({g['value']:.2f})")
    if args.arch != "bert" and args.out == common.RESULTS_DIR / "train_vs_hf.json":
        args.out = common.RESULTS_DIR / f"train_vs_hf_{args.arch}.json"
    common.write_json(args, "train_vs_hf", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
