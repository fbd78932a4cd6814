#!/usr/bin/env bash
# BERT-large training throughput and MFU on this machine's GPUs, from a bare checkout.
#
#   benchmarks/gpu.sh --quick --out-dir DIR     # the one-shot run: at most 9 minutes in all
#   benchmarks/gpu.sh [--seqs 128,512] [--modes none,vanilla,sctd] [--compile-modes eager,compiled] ...
#
# Installs what the benchmark needs when it is missing (see `setup` below), then runs
# sctd_dist/train.py (torchrun, bf16, ds_configs/zero2_bf16.json) for BERT-large at sequence
# length 128 and 512, token dropping none / vanilla / sctd (keep ratio 0.5), eager and with
# --compile, TP=1 (and TP=2 with sequence parallelism when >= 2 GPUs are visible). --quick: 20
# steps per arm (10 timed), no gradient accumulation, and a 540 s budget counted from this
# script's start: arms that no longer fit are recorded as skipped, so the run ends in time.
# Results: DIR/gpu.json (device, every arm with tokens/s per GPU, MFU, peak memory, SDPA kernel,
# compile on/off; the command) and DIR/gpu.md (table and goals); without --out-dir
# benchmarks/results/gpu.json. Run logs in runs/gpu_bench/. Exits non-zero if an arm failed.
# All flags: benchmarks/gpu.sh --help. CPU smoke run: --device-kind cpu --model tiny --seqs 64.
#
# Setup, when `import deepspeed, megatron.core, datasets` fails in the interpreter found first
# (.venv/bin/python, then $PYTHON or python3): the missing packages are added next to that
# interpreter's own, so a CUDA torch already installed there is used as it is (pinned while
# installing). Sources: PyPI, or with SCTD_WHEELHOUSE=DIR only the wheels in DIR, for machines
# without a registry: fill DIR on a machine with one by `benchmarks/gpu.sh --fetch-wheels DIR`
# (PY_VERSION=3.12 names the target's Python; about 6 MB) and carry it over.
set -euo pipefail

export SCTD_BENCH_T0=${SCTD_BENCH_T0:-$(date +%s)}  # the time budget counts the setup too
# Paths relative to the script, not the caller's directory; relative --out/--work-dir stay the
# caller's.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# What the benchmark imports besides torch (pip names): DeepSpeed and megatron-core at the
# versions the test suite runs, the rest as in pyproject.toml. The checkout itself is imported
# from its folder (no install).
DEPS=("deepspeed==0.19.8" "megatron-core==0.16.1" "transformers>=4.40" "datasets>=3.0"
      "tokenizers>=0.19" "safetensors>=0.4" "tensorboard>=2.15" "tqdm>=4.66" "psutil>=5.9" "numpy>=1.24")
# What a CUDA image with torch and transformers may lack besides DEPS (for --fetch-wheels).
EXTRA_WHEELS=(dill multiprocess xxhash hjson ninja py-cpuinfo pydantic pydantic-core annotated-types
              typing-inspection msgpack einops nvidia-ml-py)

fetch_wheels() {  # --fetch-wheels DIR: download the wheels a registry-less machine needs
    local dir=$1 py=${PY_VERSION:-3.12}
    mkdir -p "$dir"
    # DeepSpeed publishes a source archive only: build its (pure Python) wheel here.
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "${DEPS[0]}"
    # --no-deps: never torch or CUDA libraries; the target's own stay in use.
    python3 -m pip download -q --no-deps -d "$dir" --only-binary=:all: --python-version "$py" \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 "${DEPS[@]:1:8}" "${EXTRA_WHEELS[@]}"
    echo "wheels for Python $py in $dir; carry the folder and run with SCTD_WHEELHOUSE=$dir"
}

ready() { "$1" -c "import deepspeed, megatron.core, datasets, transformers" >/dev/null 2>&1; }

setup() {  # add the missing packages to interpreter $1 (pip, $SCTD_WHEELHOUSE or PyPI)
    local py=$1 pins src=()
    pins=$(mktemp)
    # An installed torch (and its triton) stays exactly as it is: no CUDA build is replaced.
    "$py" -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|triton)==' >"$pins" || true
    if [[ -n ${SCTD_WHEELHOUSE:-} ]]; then
        src=(--no-index --find-links "$SCTD_WHEELHOUSE")
    fi
    echo "setup: adding the benchmark's packages to $py (torch: $(cat "$pins" | tr '\n' ' '))"
    DS_BUILD_OPS=0 "$py" -m pip install -q "${src[@]}" -c "$pins" "${DEPS[@]}"
    rm -f "$pins"
}

if [[ ${1:-} == --fetch-wheels ]]; then
    fetch_wheels "${2:?--fetch-wheels needs a folder}"
    exit 0
fi

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON=$ROOT/.venv/bin/python  # made by `make setup`: complete
else
    PYTHON=${PYTHON:-$(command -v python3)}
    if ! ready "$PYTHON"; then
        setup "$PYTHON"
        ready "$PYTHON" || { echo "error: setup did not make deepspeed, megatron.core and datasets importable" >&2; exit 2; }
    fi
fi
echo "setup: ready after $(( $(date +%s) - SCTD_BENCH_T0 )) s ($PYTHON)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
exec "$PYTHON" "$ROOT/benchmarks/gpu_throughput.py" "$@"
