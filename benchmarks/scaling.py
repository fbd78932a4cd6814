"""Tensor- and data-parallel scaling on up to 2 ranks, through the real training entry point.

Layouts: 1 rank (TP=1, DP=1); 2 ranks as DP=2; TP=2; TP=2 with sequence parallelism. Same
model, global batch, ScTD settings and data; one CPU thread (or one GPU) per rank, so a 2-rank
layout has twice the hardware of the 1-rank one. Columns: tokens/s of the job, per rank, the
speed-up over 1 rank and its efficiency (speed-up / ranks), and the model-state bytes each rank
holds (TP shards the weights and their optimizer state; ZeRO-1 under DP shards the optimizer
state). On CPU the TP collectives go through gloo and shared memory, so TP scales worse than on
NVLink; the column that carries over to GPUs is the memory one.

    python benchmarks/scaling.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, markdown_table, write_json_atomic
from train_runs import run_training, summarize

# (name, ranks, TP, sequence parallel)
LAYOUTS = [("TP1 DP1", 1, 1, False), ("TP1 DP2", 2, 1, False), ("TP2 DP1", 2, 2, False),
           ("TP2 DP1 +SP", 2, 2, True)]
# Wide enough that TP has real GEMMs to split, small enough for a CPU: 4 layers of width 512.
MODEL = {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048, "num_hidden_layers": 4}


def run_layout(name: str, ranks: int, tp: int, sp: bool, args, folder: Path) -> dict:
    overrides = folder / "model.json"
    overrides.write_text(json.dumps(MODEL))
    train_args = ["--deepspeed_config", str(REPO_ROOT / "ds_configs" / "cpu_tiny.json"),
                  "--model", "tiny", "--model-config", str(overrides),
                  "--seq-length", str(args.seq_length), "--token-drop", args.token_drop,
                  "--train-iters", str(args.steps), "--global-batch-size", str(args.global_batch_size),
                  "--micro-batch-size", str(args.global_batch_size // (ranks // tp)),
                  "--tensor-model-parallel-size", str(tp), "--eval-iters", "0",
                  "--data-cache", str(args.data_cache)]
    if sp:
        train_args.append("--sequence-parallel")
    records = run_training(train_args, nproc=ranks, log_dir=folder / f"logs-{name.replace(' ', '_')}")
    return {"layout": name, "ranks": ranks, "tp": tp, "dp": ranks // tp, "sequence_parallel": sp,
            **summarize(records, warmup=args.warmup)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--token-drop", default="sctd", choices=["none", "vanilla", "sctd"])
    p.add_argument("--data-cache", type=Path, default=REPO_ROOT / "data_cache")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "scaling.json"))
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 4, 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, tp, sp in LAYOUTS:
            results.append(run_layout(name, ranks, tp, sp, args, Path(tmp)))
    base = results[0]["tokens_per_s"]
    rows = []
    for r in results:
        speedup = r["tokens_per_s"] / base
        rows.append([r["layout"], r["ranks"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s'] / r['ranks']:,.0f}", f"{speedup:.2f}x",
                     f"{speedup / r['ranks']:.0%}", f"{r['model_state_bytes_rank0'] / 2**20:,.1f}"])
    table = markdown_table(["layout", "ranks", "tokens/s", "tokens/s per rank", "speed-up vs 1 rank",
                            "efficiency", "model states MiB per rank"], rows)
    print(table)
    payload = {"benchmark": "scaling", "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
               "device": "cpu", "precision": "fp32", "threads_per_rank": 1, "model": MODEL,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "table": table}
    if not args.quick:
        write_json_atomic(Path(args.out), payload)


if __name__ == "__main__":
    main()
