#!/usr/bin/env bash
# BERT-large (and ModernBERT-large) training throughput and MFU on this machine's GPUs, from a
# bare checkout.
#
#   benchmarks/gpu.sh --quick --out-dir DIR     # the one-shot run: at most 9 minutes in all
#   benchmarks/gpu.sh [--seqs 128,512] [--modes none,vanilla,sctd] [--compile-modes eager,compiled] ...
#
# Installs what the benchmark needs when it is missing (see `setup` below), then runs
# sctd_dist/train.py (torchrun, bf16, ds_configs/zero2_bf16.json) for BERT-large (then
# ModernBERT-large; --archs bert leaves it out) at sequence length 128 and 512, token dropping
# none / vanilla / sctd (keep ratio 0.5), eager and with --compile, TP=1 (and TP=2 with sequence
# parallelism when >= 2 GPUs are visible). --quick: 20 steps per arm (10 timed), no gradient
# accumulation, and a 540 s budget counted from this script's start: arms that no longer fit are
# recorded as skipped, so the run ends in time. Results: DIR/gpu.json (device, every arm with
# tokens/s per GPU, MFU, peak memory, attention kernel, compile on/off; the command) and
# DIR/gpu.md (table and goals); without --out-dir
# benchmarks/results/gpu.json. Run logs in runs/gpu_bench/. Exits non-zero if an arm failed.
# All flags: benchmarks/gpu.sh --help. CPU smoke run: --device-kind cpu --model tiny --seqs 64.
#
# Setup, when `import deepspeed, megatron.core, datasets` fails in the interpreter found first
# (.venv/bin/python, then $PYTHON or python3): a virtual environment ($SCTD_BENCH_VENV, default
# .venv-bench) that sees that interpreter's packages gets the missing ones, so a CUDA torch
# already installed is used as it is (pinned while installing; a CPU torch is never installed
# on a host whose nvidia-smi lists GPUs). Sources: PyPI, or with SCTD_WHEELHOUSE=DIR only the
# wheels in DIR, for machines without a registry: fill DIR on a machine with one by
# `benchmarks/gpu.sh --fetch-wheels DIR` (PY_VERSION=3.12 names the target's Python; 49 wheels,
# 119 MB, of which pyarrow is 55 MB: everything but the torch stack) and carry it over.
#
# Never a wasted run: when nvidia-smi lists GPUs that torch cannot see, it stops at once with one
# line (driver, torch's CUDA version) instead of benchmarking the CPU; setup has a time limit
# (SCTD_SETUP_TIMEOUT_S, 600 s), and whatever ends the script, the result file (gpu.json) exists
# and says what ran, what failed and why.
set -uo pipefail

export SCTD_BENCH_T0=${SCTD_BENCH_T0:-$(date +%s)}  # the time budget counts the setup too
# Paths relative to the script, not the caller's directory; relative --out/--work-dir stay the
# caller's.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# What the benchmark imports besides torch (pip names): DeepSpeed and megatron-core at the
# versions the test suite runs, the rest as in pyproject.toml (tensorboard is optional: the
# benchmark's runs log without it). The checkout itself is imported from its folder (no install).
DEPS=("deepspeed==0.19.8" "megatron-core==0.16.1" "transformers>=4.40" "datasets>=3.0"
      "tokenizers>=0.19" "safetensors>=0.4" "tqdm>=4.66" "psutil>=5.9" "numpy>=1.24")
# What a host with torch has already and a wheel folder leaves out: torch, its CUDA libraries
# and the packages only torch asks for.
TORCH_STACK='^(torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|jinja2|markupsafe|setuptools)$'
SETUP_TIMEOUT_S=${SCTD_SETUP_TIMEOUT_S:-600}

fetch_wheels() {  # --fetch-wheels DIR: every wheel a registry-less machine with torch needs
    local dir=$1 py=${PY_VERSION:-3.12} report pins
    local target=(--only-binary=:all: --python-version "$py" --platform manylinux_2_28_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    mkdir -p "$dir" || return 1
    report=$(mktemp) pins=$(mktemp)
    # DeepSpeed publishes a source archive only: build its (pure Python) wheel here.
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "${DEPS[0]}" || return 1
    # The whole dependency closure for the target's Python, resolved as pip would there...
    python3 -m pip install -q --dry-run --ignore-installed --report "$report" --target "$dir/.resolve" \
        --find-links "$dir" "${target[@]}" "${DEPS[@]}" || return 1
    # ... less the torch stack, which the target's own CUDA build provides.
    python3 - "$report" "$TORCH_STACK" >"$pins" <<'PY' || return 1
import json, re, sys
report, stack = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not stack.match(re.sub(r"[-_.]+", "-", name).lower()):
        print(f"{name}=={version}")
PY
    python3 -m pip download -q --no-deps -d "$dir" --find-links "$dir" "${target[@]}" -r "$pins" || return 1
    rm -rf "$report" "$pins" "$dir/.resolve"
    echo "$(find "$dir" -name '*.whl' | wc -l) wheels ($(du -sh "$dir" | cut -f1)) for Python $py in $dir;" \
        "carry the folder and run with SCTD_WHEELHOUSE=$dir"
}

if [[ ${1:-} == --fetch-wheels ]]; then
    fetch_wheels "${2:?--fetch-wheels needs a folder}"
    exit $?
fi

# The result file, as gpu_throughput.py will name it (--out-dir DIR / --out FILE).
RESULT=$ROOT/benchmarks/results/gpu.json
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --out-dir) RESULT=${args[i + 1]:-.}/gpu.json ;;
        --out-dir=*) RESULT=${args[i]#--out-dir=}/gpu.json ;;
        --out) RESULT=${args[i + 1]:-gpu.json} ;;
        --out=*) RESULT=${args[i]#--out=} ;;
    esac
done
PHASE=setup
ERROR=""
CMDLINE="$0 $*"

# shellcheck disable=SC2329  # the EXIT trap runs it
write_result() {  # on every exit: complete what gpu_throughput.py wrote, or write it
    local rc=$?
    [[ $rc == 0 && $PHASE == finished ]] && return
    [[ -n $ERROR ]] || ERROR="stopped in the $PHASE phase with exit code $rc"
    mkdir -p "$(dirname "$RESULT")" 2>/dev/null || true
    if command -v python3 >/dev/null 2>&1; then
        RC=$rc PHASE=$PHASE ERROR=$ERROR RESULT=$RESULT CMD=$CMDLINE python3 - <<'PY' || true
import json, os, time
path = os.environ["RESULT"]
try:
    with open(path) as f:
        data = json.load(f)
except (OSError, ValueError):
    data = {"benchmark": "gpu_throughput", "arms": [], "command": os.environ["CMD"]}
if not data.get("complete") or data.get("failed_arms"):
    data.setdefault("complete", False)
    data.update(exit_code=int(os.environ["RC"]), failed_phase=os.environ["PHASE"],
                error=os.environ["ERROR"], ran=[a["name"] for a in data.get("arms", []) if a.get("status") == "ok"],
                ended=time.time())
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)
PY
    else
        printf '{"benchmark": "gpu_throughput", "complete": false, "exit_code": %d, "failed_phase": "%s", "error": "%s"}\n' \
            "$rc" "$PHASE" "${ERROR//\"/\'}" >"$RESULT"
    fi
    echo "result file: $RESULT" >&2
}
trap write_result EXIT

fail() {  # one line on stderr, recorded in the result file; exit code $2
    ERROR=$1
    echo "error: $1" >&2
    exit "${2:-2}"
}

listed_gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

check_visible_gpus() {  # stop when nvidia-smi lists GPUs that interpreter $1's torch cannot see
    local py=$1 listed seen
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    listed=$(listed_gpus)
    [[ $listed -gt 0 ]] || return 0
    seen=$("$py" -c "import torch; print(torch.cuda.device_count(), torch.__version__, torch.version.cuda or 'none (a CPU build)')" 2>/dev/null) \
        || return 0  # no torch yet: setup installs the CUDA build
    read -r count version cuda <<<"$seen"
    if [[ $count == 0 ]]; then
        local driver
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
        fail "nvidia-smi lists $listed GPU(s) (driver ${driver:-unknown}) but torch $version (CUDA $cuda) sees none; install a CUDA build of torch this driver supports (or fix CUDA_VISIBLE_DEVICES); not benchmarking the CPU instead" 3
    fi
}

ready() { "$1" -c "import deepspeed, megatron.core, datasets, transformers" >/dev/null 2>&1; }

setup() {  # add the missing packages to interpreter $1 (pip, $SCTD_WHEELHOUSE or PyPI)
    local py=$1 pins src=() extra=()
    pins=$(mktemp)
    # An installed torch (and its triton) stays exactly as it is: no CUDA build is replaced.
    "$py" -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|triton)==' >"$pins" || true
    if [[ -n ${SCTD_WHEELHOUSE:-} ]]; then
        src=(--no-index --find-links "$SCTD_WHEELHOUSE")
    fi
    # No torch at all: on a GPU host the registry's default (CUDA) build, never a +cpu wheel.
    grep -q '^torch==' "$pins" || extra=(torch)
    echo "setup: adding the benchmark's packages to $py (torch: $(tr '\n' ' ' <"$pins"))"
    DS_BUILD_OPS=0 timeout "$SETUP_TIMEOUT_S" "$py" -m pip install -q "${src[@]}" -c "$pins" \
        "${extra[@]}" "${DEPS[@]}"
    local rc=$?
    rm -f "$pins"
    [[ $rc == 124 ]] && fail "setup took longer than SCTD_SETUP_TIMEOUT_S=$SETUP_TIMEOUT_S s (pip install)" 4
    return "$rc"
}

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON=$ROOT/.venv/bin/python  # made by `make setup`: complete
    check_visible_gpus "$PYTHON"
else
    BASE=${PYTHON:-$(command -v python3)}
    check_visible_gpus "$BASE"
    PYTHON=$BASE
    if ! ready "$PYTHON"; then
        # A virtual environment that sees the system's packages (its CUDA torch): externally
        # managed Pythons (Debian 12, Ubuntu 23.04+) refuse installs into the system itself.
        # An interpreter that already runs in one is used as it is (venvs do not nest).
        VENV=$("$BASE" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')
        VENV=${VENV:-${SCTD_BENCH_VENV:-$ROOT/.venv-bench}}
        [[ -x $VENV/bin/python ]] || "$BASE" -m venv --system-site-packages "$VENV" \
            || fail "could not make the virtual environment $VENV with $BASE (install python3-venv)" 4
        PYTHON=$VENV/bin/python
        if ! ready "$PYTHON"; then
            setup "$PYTHON" || fail "setup could not install the benchmark's packages into $VENV (see pip's message above)" 4
            ready "$PYTHON" || fail "setup did not make deepspeed, megatron.core and datasets importable in $VENV" 4
        fi
        check_visible_gpus "$PYTHON"
    fi
fi
echo "setup: ready after $(( $(date +%s) - SCTD_BENCH_T0 )) s ($PYTHON)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
PHASE=benchmark
errlog=$(mktemp)
# stderr shown as it comes and kept, for the result file's error
{ "$PYTHON" "$ROOT/benchmarks/gpu_throughput.py" "$@" 2>&1 1>&3 | tee "$errlog" >&2; } 3>&1
rc=${PIPESTATUS[0]}
case $rc in
    0) PHASE=finished ;;
    1) ERROR="an arm failed (its error is in its entry under arms)" ;;
    *) ERROR=$(grep -v '^\s*$' "$errlog" | tail -n 1) ;;
esac
rm -f "$errlog"
exit "$rc"
