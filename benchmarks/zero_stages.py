"""End-to-end training throughput and memory per ZeRO stage (the real entry point, 2 ranks).

Runs `sctd_dist/train.py` under torchrun with DP=2 on the CPU (or on the GPUs of this machine)
for ZeRO stages 0-3, for the tiny model and a base-width model, and reads what the run itself
logged: tokens/s over the steps after the first two, the bytes of model states each rank holds
(parameters or their ZeRO partition, fp32 master partitions, Adam moments) and rank 0's peak
memory (peak RSS on CPU: the Python/torch/DeepSpeed runtime included). Stages run one after
another, so a shared machine's load can differ between them: the JSON keeps the load average
next to each number.

    python benchmarks/zero_stages.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO_ROOT, markdown_table, write_json_atomic
from train_runs import run_training, summarize

STAGE_FILES = {0: "zero0_fp32.json", 1: "zero1_bf16.json", 2: "zero2_bf16.json", 3: "zero3_bf16.json"}
MODELS = {
    "tiny": {},
    # Base width (768 hidden, 12 heads, 3072 FFN) with 4 layers (token dropping needs 4): CPU-sized.
    "base-width-4L": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                      "num_hidden_layers": 4},
}


# The presets' communication buckets (50M elements) are sized for BERT-large and beyond; on a
# CPU-sized model they would be larger than the model itself and dominate its memory. Every
# stage gets the same, model-sized buckets here.
SMALL_BUCKETS = {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000}
SMALL_BUCKETS_Z3 = {"stage3_prefetch_bucket_size": 5_000_000, "stage3_max_live_parameters": 20_000_000}


def _fp32(stage: int, folder: Path) -> Path:
    cfg = json.loads((REPO_ROOT / "ds_configs" / STAGE_FILES[stage]).read_text())
    cfg.pop("bf16", None)  # bf16 is 20x slower than fp32 on AVX2 CPUs: compare stages in fp32
    zero = cfg.setdefault("zero_optimization", {"stage": stage})
    if stage in (1, 2):
        zero.update(SMALL_BUCKETS)
    elif stage == 3:
        zero.update(reduce_bucket_size=SMALL_BUCKETS["reduce_bucket_size"], **SMALL_BUCKETS_Z3)
    out = folder / f"zero{stage}.json"
    out.write_text(json.dumps(cfg))
    return out


def run_stage(stage: int, model: str, steps: int, seq: int, batch: int, folder: Path) -> dict:
    overrides = folder / f"{model}.json"
    overrides.write_text(json.dumps(MODELS[model]))
    records = run_training(
        ["--deepspeed_config", str(_fp32(stage, folder)), "--model", "tiny", "--model-config",
         str(overrides), "--seq-length", str(seq), "--token-drop", "sctd", "--train-iters", str(steps),
         "--global-batch-size", str(batch), "--micro-batch-size", str(batch // 2), "--eval-iters", "0",
         "--data-cache", str(folder.parent / "data_cache")],
        nproc=2, log_dir=folder / f"logs-{model}-z{stage}")
    return {"stage": stage, "model": model, **summarize(records, warmup=2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {list(MODELS)}")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "zero_stages.json"))
    args = p.parse_args()
    steps = 4 if args.quick else args.steps
    models = ["tiny"] if args.quick else args.models.split(",")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        for model in models:
            for stage in sorted(STAGE_FILES):
                r = run_stage(stage, model, steps, args.seq_length, args.global_batch_size, folder)
                results.append(r)
                rows.append([model, stage, f"{r['tokens_per_s']:,.0f}",
                             f"{r['model_state_bytes_rank0'] / 2**20:,.1f}",
                             f"{r['peak_memory_bytes_rank0'] / 2**20:,.0f}"])
    table = markdown_table(["model", "ZeRO", "tokens/s (2 ranks)", "model states MiB per rank",
                            "peak RSS MiB (rank 0)"], rows)
    print(table)
    payload = {"benchmark": "zero_stages",
               "command": " ".join(["python", "benchmarks/zero_stages.py", *sys.argv[1:]]), "device": "cpu",
               "precision": "fp32", "ranks": 2, "seq_length": args.seq_length,
               "global_batch_size": args.global_batch_size, "models": MODELS,
               "bucket_overrides": {"zero1_2": SMALL_BUCKETS, "zero3": SMALL_BUCKETS_Z3},
               "results": results,
               "table": table}
    if not args.quick:
        write_json_atomic(Path(args.out), payload)


if __name__ == "__main__":
    main()
