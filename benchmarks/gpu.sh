#!/usr/bin/env bash
# BERT-large training throughput and MFU on this machine's GPUs (issue 7).
#
#   benchmarks/gpu.sh [--quick] [--seqs 128,512] [--modes none,vanilla,sctd] [--tp 1,2] ...
#
# Runs sctd_dist/train.py (torchrun, bf16, ds_configs/zero2_bf16.json) for BERT-large at
# sequence length 128 and 512, TP=1 (and TP=2 with sequence parallelism when >= 2 GPUs are
# visible), token dropping none / vanilla / sctd (keep ratio 0.5): 30 steps per arm, the first
# 10 untimed. About 10-15 min on one H100 (twice that with TP=2 arms); --quick: ~5 min.
# Results: benchmarks/results/gpu.json (device, every arm, the command) and a markdown table on
# stdout; run logs in runs/gpu_bench/. Exits non-zero if any arm failed (its error is in the JSON).
# All flags: benchmarks/gpu.sh --help. CPU smoke run: --device-kind cpu --model tiny --seqs 64.
set -euo pipefail

# Paths relative to the script, not the caller's directory; relative --out/--work-dir stay the
# caller's.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON=$ROOT/.venv/bin/python
else
    PYTHON=python3
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
exec "$PYTHON" "$ROOT/benchmarks/gpu_throughput.py" "$@"
