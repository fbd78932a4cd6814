"""The CPU memory allocator side by side: the same training step under the system's malloc,
glibc malloc with our settings, tcmalloc and jemalloc (those installed).

The allocator is fixed when a process starts, so every (allocator, round) is one worker process
(`--worker`) started through `sctd_dist.allocator`'s environment; the rounds rotate the order so
load from other processes hits every allocator alike. A worker times forward + backward steps
of our BertForMaskedLM and of transformers' (same config and weights, as model_step.py) and
reports the median step time of each; the result is each allocator's median over rounds, as a
ratio to the system allocator's.

    .venv/bin/python benchmarks/allocator.py            # base width, 2 layers, seq 128; ~4 min
    .venv/bin/python benchmarks/allocator.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from sctd_dist import allocator  # noqa: E402

CANDIDATES = ("system", "glibc", "tcmalloc", "jemalloc")
_SETTING_KEYS = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", allocator.ENV_CHOICE,
                 "SCTD_ALLOCATOR_APPLIED")


def worker_env(name: str) -> dict[str, str]:
    """A clean environment with allocator `name` (nothing inherited from this process's own)."""
    base = {k: v for k, v in os.environ.items() if k not in _SETTING_KEYS}
    base[allocator.ENV_CHOICE] = name
    return allocator.environment(allocator.choose(base), base)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time our step and transformers' step in this process (its allocator is the arm)."""
    torch.set_num_threads(args.threads)
    from model_step import build_models, make_steps

    ctx = common.init_single_process()
    ns = argparse.Namespace(base_layers=args.layers, vocab=30522, dropout=None, seed=1234,
                            bf16_mode="cast")
    ours, hf, _ = build_models("base-w", ns, ctx, torch.device("cpu"), "fp32")
    batch = common.mlm_batch(args.batch, args.seq, 30522, 0.15, torch.device("cpu"), 1234)
    arms = make_steps(ours, hf, batch, None, torch.device("cpu"), "fp32", ns)
    times = common.interleaved(arms, warmup=2, repeats=args.steps, device=torch.device("cpu"))
    return {"in_use": allocator.in_use(), "median_s": {k: common.median(v) for k, v in times.items()},
            "times_s": times}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="layers of the base-width model")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per worker")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "allocator.json")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    arms = [name for name in CANDIDATES if name in ("system", "glibc") or allocator.find_library(name)]
    env = common.environment(argparse.Namespace(quick=args.quick), torch.device("cpu"))
    worker_args = [sys.executable, __file__, "--worker", "--layers", str(args.layers), "--seq",
                   str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for name in common.rotate(arms, r):
            proc = subprocess.run(worker_args, env=dict(worker_env(name), OMP_NUM_THREADS=str(args.threads)),
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"worker under {name} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(out)
            print(f"round {r} {name:9s} ours {out['median_s']['ours']:.3f}s hf {out['median_s']['hf']:.3f}s "
                  f"({out['in_use']})", flush=True)
    med = {name: {m: common.median(o["median_s"][m] for o in results[name]) for m in ("ours", "hf")}
           for name in arms}
    ratio = {name: {m: med[name][m] / med["system"][m] for m in ("ours", "hf")} for name in arms}
    chosen = allocator.choose({k: v for k, v in os.environ.items() if k != allocator.ENV_CHOICE}).name
    table = common.markdown_table(
        ["allocator", "in use (as the worker saw it)", "ours step s", "vs system", "HF step s", "vs system"],
        [[name + (" (default)" if name == chosen else ""), results[name][0]["in_use"],
          med[name]["ours"], f"{ratio[name]['ours']:.2f}x", med[name]["hf"], f"{ratio[name]['hf']:.2f}x"]
         for name in arms])
    payload = {"benchmark": "allocator", "environment": env,
               "settings": common.plain_settings(args),
               "default_choice": chosen, "runs": results, "median_step_s": med,
               "ratio_vs_system": ratio, "table": table, "wall_s": time.perf_counter() - t0}
    print()
    print(table)
    common.write_json(args, "allocator", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
