"""BERT-large (and ModernBERT-large) training throughput and model-FLOPs utilisation on GPUs, via
the real training entry point.

Every arm (architecture x sequence length x tensor-parallel size x token-drop mode) is one run of
`sctd_dist/train.py` under torchrun (`train_runs.run_training`); the numbers are what that run
wrote to its own metrics.jsonl, over the steps after the warmup. Arms run one after another on
the same GPUs; this process never touches CUDA itself (the device is probed in a subprocess), so
all GPU memory belongs to the runs.

    benchmarks/gpu.sh                       # H100: seq 128 + 512, TP=1 (+ TP=2 with >= 2 GPUs)
    benchmarks/gpu.sh --quick               # fewer steps, no gradient accumulation
    benchmarks/gpu.sh --device-kind cpu --model tiny --seqs 64 --modes none,vanilla \\
        --train-iters 4 --warmup 1          # CPU smoke run of the script itself (fp32, no MFU)

Per arm: tokens/s per GPU (all tokens of the global batch over the run's GPUs), TFLOP/s per GPU
and MFU as counted by `sctd_dist.metrics` (matmul FLOPs of the layer schedule that actually ran,
`sctd_dist.flops`; a dropping arm is credited only with the FLOPs it performs), against the
device's dense bf16 peak. Against the `none` arm of the same (architecture, seq, TP): MFU difference in points,
the theoretical step-FLOP ratio (`step_flops_per_sequence`, averaged over one ScTD interval for
sctd), the measured time ratio and realised = measured saving / theoretical saving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from common import REPO_ROOT, RESULTS_DIR, device_name, environment, markdown_table, write_json_atomic
from train_runs import TrainingRunFailed, run_training, summarize

from sctd_dist.ds_config import load_ds_config, precision
from sctd_dist.flops import peak_tflops, step_flops_per_sequence
from sctd_dist.model.arch import ARCHS, ModelConfig, config_from_preset
from sctd_dist.model.config import PRESETS, TokenDropConfig
from sctd_dist.model.router import num_kept

MODES = ("none", "vanilla", "sctd")
KEEP_RATIO = 0.5
SCTD_INTERVAL = 10  # train.py's default --sctd-interval; the timed window must cover whole ones
# metrics.py counts the MLM head at 15% of the positions; the theory here must count alike.
MASK_FRACTION = 0.15
# The BERT vocabulary. Without it the model would take the 8192-word vocabulary of the embedded
# sample corpus's tokenizer, which makes the MLM head and embeddings smaller than BERT-large's.
BERT_VOCAB = 30522
# Each architecture's released vocabulary (ModernBERT's tokenizer: 50368 rows).
ARCH_VOCAB = {"bert": BERT_VOCAB, "modernbert": 50368}
# Per-GPU micro-batches for an 80 GB GPU in bf16 without activation checkpointing: 8192 tokens
# per micro-batch at both lengths, leaving room for ScTD's second (full-token) pass.
GPU_MICRO_BATCH = {128: 64, 512: 16}
GPU_TOKENS_PER_MICRO = 8192
# The pretraining recipe's global batch (slurm/pretrain_large.sh): gradient accumulation makes
# the optimizer step, which token dropping does not shorten, weigh what it weighs in a real run.
GPU_GLOBAL_BATCH = 256
CPU_MICRO_BATCH = 2
# The one-shot run (`gpu.sh --quick`) must end within 9 minutes, installation included.
ONE_SHOT_BUDGET_S = 540.0
# Per-arm and corpus time limits of the one-shot run (eager / compiled arms).
QUICK_ARM_TIMEOUT_S = {False: 240.0, True: 360.0}
CORPUS_TIMEOUT_S = 300.0
ENV_START = "SCTD_BENCH_T0"  # epoch seconds at which gpu.sh started (before installing)
ENV_MICRO = "SCTD_BENCH_MICRO_BATCH"
ENV_GLOBAL = "SCTD_BENCH_GLOBAL_BATCH"

_PROBE = ("import json, torch\n"
          "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
          "print(json.dumps({'count': n, 'names': [torch.cuda.get_device_name(i) for i in range(n)],"
          " 'cuda': torch.version.cuda}))\n")


# ----------------------------------------------------------------------------- configuration

def probe_gpus() -> dict[str, Any]:
    """GPU count, names and CUDA version, asked of a short-lived subprocess so that this process
    never creates a CUDA context (it would hold memory on GPU 0 for the whole benchmark)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"count": 0, "names": [], "cuda": None, "probe_error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_int_list(text: str, what: str) -> list[int]:
    """"128,512" -> [128, 512]; a clear error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_per_seq(text: str, what: str) -> dict[int, int] | int:
    """A batch size: one integer for every length, or "SEQ:N,SEQ:N" per sequence length."""
    text = text.strip()
    try:
        if ":" not in text:
            value = int(text)
            if value < 1:
                raise ValueError
            return value
        out = {}
        for item in text.split(","):
            seq, n = item.split(":")
            out[int(seq)] = int(n)
            if out[int(seq)] < 1:
                raise ValueError
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be a positive integer or SEQ:N[,SEQ:N...], got {text!r}") from None


def micro_batch_for(seq: int, setting: dict[int, int] | int | None, kind: str) -> int:
    """The per-GPU micro-batch of an arm: the flag/env value, else the defaults above (other
    lengths on a GPU keep 8192 tokens per micro-batch)."""
    if isinstance(setting, int):
        return setting
    if isinstance(setting, dict) and seq in setting:
        return setting[seq]
    if kind == "cpu":
        return CPU_MICRO_BATCH
    return GPU_MICRO_BATCH.get(seq, max(1, GPU_TOKENS_PER_MICRO // seq))


def global_batch_for(micro: int, dp: int, setting: int | None, kind: str, quick: bool) -> int:
    """Global batch of an arm: the flag/env value, else 256 on a GPU (one micro-batch per rank
    with --quick) and one micro-batch per rank on the CPU. Must be a multiple of micro x DP."""
    if setting is not None:
        glob = setting
    elif kind == "cuda" and not quick:
        glob = max(GPU_GLOBAL_BATCH, micro * dp)
    else:
        glob = micro * dp
    if glob % (micro * dp):
        raise ValueError(f"global batch {glob} is not a multiple of micro-batch {micro} x DP {dp}; "
                         "change --global-batch or --micro-batch")
    return glob


def precision_of(ds_config: Path) -> str:
    """bf16 / fp16 / fp32, as the DeepSpeed JSON enables it (the training entry point's rule)."""
    dtype = precision(load_ds_config(ds_config))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def theoretical_ratio(model_cfg: ModelConfig, mode: str, seq: int) -> float:
    """Step FLOPs of `mode` over those of no dropping, per sequence; for sctd the mean over one
    ScTD interval (one consistency step with the extra full-token pass, interval-1 plain ones)."""
    base = step_flops_per_sequence(model_cfg, TokenDropConfig(mode="none"), seq,
                                   MASK_FRACTION * seq, 0, None)
    if mode == "none":
        return 1.0
    drop = TokenDropConfig(mode=mode, keep_ratio=KEEP_RATIO, sctd_interval=SCTD_INTERVAL)
    kept = num_kept(seq, KEEP_RATIO)
    steps = range(SCTD_INTERVAL) if mode == "sctd" else range(1)
    flops = [step_flops_per_sequence(model_cfg, drop, seq, MASK_FRACTION * seq, s, kept) for s in steps]
    return sum(flops) / len(flops) / base


# ----------------------------------------------------------------------------- arms

def arm_order(arm: dict[str, Any]) -> tuple:
    """Arms in order of value, so a run cut short keeps what matters most: BERT's no-drop
    baselines at TP=1 eager (the longest sequence first: the MFU goal's), then its dropping
    modes, then ModernBERT's TP=1 eager arms in the same order, then TP > 1, compiled arms last."""
    return (arm["compile"], arm["tp"] > 1, ARCHS.index(arm["arch"]), arm["mode"] != "none",
            -arm["seq_length"], arm["tp"], MODES.index(arm["mode"]))


def vocab_size(args: argparse.Namespace, arch: str) -> int:
    """--vocab-size, else the architecture's released vocabulary."""
    return args.vocab_size or ARCH_VOCAB[arch]


def build_arms(args: argparse.Namespace, kind: str, gpus: int) -> list[dict[str, Any]]:
    """Every (architecture, compile, seq, TP, mode) configuration, in `arm_order`."""
    arms = []
    for arch, compiled, seq, tp in ((a, c, s, t) for a in args.archs for c in args.compile_modes
                                    for s in args.seqs for t in args.tp):
        model_cfg = config_from_preset(arch, args.model, {"vocab_size": vocab_size(args, arch)})
        nproc = tp  # one rank per TP shard, DP = 1: per-GPU numbers without DP communication
        dp = nproc // tp
        # TP > 1 runs with sequence parallelism (Megatron's recommendation with TP): the
        # same communication volume as TP's all-reduces, as reduce-scatter + all-gather,
        # and LayerNorm/dropout activations sharded instead of replicated.
        sp = tp > 1 and args.sequence_parallel
        micro = micro_batch_for(seq, args.micro_batch, kind)
        for mode in args.modes:
            arm: dict[str, Any] = {
                "name": ("" if arch == "bert" else f"{arch}-") + f"s{seq}-tp{tp}-{mode}"
                        + ("-compiled" if compiled else ""),
                "arch": arch, "seq_length": seq, "tp": tp, "nproc": nproc, "dp": dp, "sequence_parallel": sp,
                "mode": mode, "compile": compiled, "micro_batch": micro,
                "theory_flop_ratio": theoretical_ratio(model_cfg, mode, seq),
            }
            try:
                arm["global_batch"] = global_batch_for(micro, dp, args.global_batch, kind, args.quick)
            except ValueError as exc:
                arm["global_batch"] = None
                arm["skip_reason"] = str(exc)
            if kind == "cuda" and nproc > gpus:
                arm["skip_reason"] = f"needs {nproc} GPUs, {gpus} visible"
            arms.append(arm)
    return sorted(arms, key=arm_order)


def train_args_for(arm: dict[str, Any], args: argparse.Namespace, model_config: Path) -> list[str]:
    """The sctd_dist/train.py flags of one arm (torchrun and --log-dir are added by run_training)."""
    out = ["--deepspeed_config", str(args.ds_config), "--arch", arm["arch"], "--model", args.model,
           "--model-config", str(model_config), "--seq-length", str(arm["seq_length"]),
           "--token-drop", arm["mode"], "--token-keep-ratio", str(KEEP_RATIO),
           "--tensor-model-parallel-size", str(arm["tp"]),
           "--train-iters", str(args.train_iters), "--micro-batch-size", str(arm["micro_batch"]),
           "--global-batch-size", str(arm["global_batch"]), "--eval-iters", "0",
           "--data-cache", str(args.data_cache)]
    if arm["sequence_parallel"]:
        out.append("--sequence-parallel")
    if arm["compile"]:
        out.append("--compile")
    if args.activation_checkpointing:
        out.append("--activation-checkpointing")
    return out


def threads_per_rank(nproc: int, kind: str) -> int:
    """OMP threads of each rank: the caller's OMP_NUM_THREADS when set (on a shared CPU machine
    oversubscribed OpenMP threads spin against each other and multiply step times), else the
    cores shared out between the CPU ranks, or a few host threads per GPU rank."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = os.cpu_count() or 1
    return max(1, cores // nproc) if kind == "cpu" else max(1, min(8, cores // nproc))


def start_record(log_dir: Path) -> dict[str, Any]:
    """The run's start record (allocator, SDPA kernel, compile on/off), {} when absent."""
    path = log_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") in ("start", "resume"):
                return record
    return {}


def run_arm(arm: dict[str, Any], args: argparse.Namespace, model_config: Path, kind: str,
            budget: "Budget") -> None:
    """Run one arm and fill in its numbers, or its error: one failed arm (an OOM, say) must not
    cost the results of the others. An arm the time budget cannot fit is skipped."""
    train_args = train_args_for(arm, args, model_config)
    log_dir = args.work_dir / "logs" / arm["name"]
    arm["train_args"] = train_args
    arm["log_dir"] = str(log_dir)
    if arm.get("skip_reason"):
        arm.update(status="failed", error=f"not run: {arm['skip_reason']}")
        return
    if not budget.fits(arm["compile"]):
        arm.update(status="skipped", error=f"not run: {budget.left():.0f} s of the "
                                           f"{args.budget_s:.0f} s budget left")
        return
    shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    threads = threads_per_rank(arm["nproc"], kind)
    t0 = time.perf_counter()
    try:
        records = run_training(train_args, arm["nproc"], log_dir, threads_per_rank=threads,
                               timeout=budget.timeout(arm_timeout(args, arm["compile"])),
                               tuned_allocator=kind == "cpu")
        if len(records) != args.train_iters:
            raise RuntimeError(f"metrics.jsonl holds {len(records)} step records, expected {args.train_iters}")
        stats = summarize(records, warmup=args.warmup)
    # A failed or timed-out run, or a short log, fails this arm only. Ctrl-C still stops all.
    except (TrainingRunFailed, RuntimeError, OSError) as exc:
        text = "".join(traceback.format_exception_only(type(exc), exc))
        arm.update(status="failed", error=text[-4000:], oom="out of memory" in text.lower(),
                   wall_s=time.perf_counter() - t0)
        return
    finally:
        start = start_record(log_dir)
        arm.update(sdpa_backend=start.get("sdpa_backend"), allocator=start.get("allocator"))
    gpus = arm["nproc"]
    arm.update(status="ok", wall_s=time.perf_counter() - t0, threads_per_rank=threads, **stats)
    budget.record(arm["compile"], arm["wall_s"])
    arm["tokens_per_s_per_gpu"] = stats["tokens_per_s"] / gpus
    arm.setdefault("mfu", None)


def arm_timeout(args: argparse.Namespace, compiled: bool) -> float:
    """One arm's time limit: --timeout, or under --quick a few times what an arm should take, so
    one hang cannot eat the rest of the budget."""
    if args.timeout is not None:
        return args.timeout
    return QUICK_ARM_TIMEOUT_S[compiled] if args.quick else 3600.0


class Budget:
    """Wall-clock budget of the whole benchmark, counted from `t0` (the shell entry passes the
    moment it started, so installing counts too). An arm starts only when the time left covers
    what an arm of its kind (eager / compiled) took so far, or a first guess."""

    FIRST_GUESS_S = {False: 45.0, True: 120.0}

    def __init__(self, seconds: float, t0: float) -> None:
        self.seconds, self.t0 = seconds, t0
        self.walls: dict[bool, list[float]] = {False: [], True: []}

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def fits(self, compiled: bool) -> bool:
        walls = self.walls[compiled]
        need = max(walls) if walls else self.FIRST_GUESS_S[compiled]
        return self.left() >= need

    def timeout(self, per_arm: float) -> float:
        return max(1.0, min(per_arm, self.left()))

    def record(self, compiled: bool, wall: float) -> None:
        self.walls[compiled].append(wall)


def add_comparisons(arms: list[dict[str, Any]]) -> None:
    """Each arm against the `none` arm of the same (architecture, seq, TP, compile): MFU
    difference, measured time ratio (baseline tokens/s over this arm's: the global batch and
    length are the same) and realised = measured saving / theoretical saving."""
    def key(a: dict[str, Any]) -> tuple:
        return a["arch"], a["seq_length"], a["tp"], a["compile"]

    base = {key(a): a for a in arms if a["mode"] == "none" and a.get("status") == "ok"}
    for a in arms:
        a.update(mfu_minus_baseline=None, measured_time_ratio=None, realised_saving=None)
        b = base.get(key(a))
        if b is None or a.get("status") != "ok":
            continue
        if a.get("mfu") is not None and b.get("mfu") is not None:
            a["mfu_minus_baseline"] = a["mfu"] - b["mfu"]
        a["measured_time_ratio"] = b["tokens_per_s"] / a["tokens_per_s"]
        if a["mode"] != "none" and a["theory_flop_ratio"] < 1.0:
            a["realised_saving"] = (1.0 - a["measured_time_ratio"]) / (1.0 - a["theory_flop_ratio"])


def goals(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked where the numbers exist (pass None: not measurable here)."""
    out = []
    for a in arms:
        if a.get("status") != "ok":
            continue
        if a["mode"] == "none" and a["seq_length"] == 512:
            out.append({"goal": f"{a['name']}: baseline MFU >= 45%", "value": a["mfu"],
                        "pass": None if a["mfu"] is None else a["mfu"] >= 0.45})
        if a["mode"] != "none":
            d = a["mfu_minus_baseline"]
            out.append({"goal": f"{a['name']}: MFU within 5 points of the baseline", "value": d,
                        "pass": None if d is None else d >= -0.05})
        if a["mode"] == "vanilla":
            r = a["realised_saving"]
            out.append({"goal": f"{a['name']}: realises >= 90% of the theoretical saving", "value": r,
                        "pass": None if r is None else r >= 0.9})
    return out


# ----------------------------------------------------------------------------- output

def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(arms: list[dict[str, Any]]) -> str:
    """The markdown table printed at the end and stored in the JSON."""
    headers = ["arch", "seq", "TP", "SP", "mode", "compile", "attention kernel", "micro/global", "tokens/s per GPU",
               "TFLOP/s per GPU", "MFU", "MFU - baseline MFU (pts)", "theory FLOP ratio",
               "measured time ratio", "realised saving", "peak mem GiB", "status"]
    rows = []
    for a in arms:
        ok = a.get("status") == "ok"
        rows.append([
            a["arch"], a["seq_length"], a["tp"], "on" if a["sequence_parallel"] else "off", a["mode"],
            "on" if a["compile"] else "off", a.get("sdpa_backend") or "-",
            f"{a['micro_batch']}/{a.get('global_batch')}",
            f"{a['tokens_per_s_per_gpu']:,.0f}" if ok else "-",
            _num(a.get("tflops_per_device") if ok else None, ".3g"),
            _pct(a.get("mfu")), _pct(a.get("mfu_minus_baseline"), signed=True),
            f"{a['theory_flop_ratio']:.3f}", _num(a.get("measured_time_ratio"), ".3f"),
            _num(a.get("realised_saving"), ".2f"),
            _num(a["peak_memory_bytes_rank0"] / 2**30 if ok else None, ".1f"),
            "ok" if ok else ("OOM" if a.get("oom") else a.get("status", "failed")),
        ])
    return markdown_table(headers, rows)


def prepare_data(cache: Path, seq: int, timeout: float) -> str | None:
    """Build the embedded sample corpus at length `seq` (in a child process with a time limit),
    just before the first arm that needs it: the first result does not wait for the other
    lengths, and the arms only read the cache. Returns the error, or None."""
    code = ("import sys; from pathlib import Path; from sctd_dist.data.sample_cache import ensure_sample_dataset; "
            "print(ensure_sample_dataset(Path(sys.argv[1]), seq_length=int(sys.argv[2])))")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(cache), str(seq)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"building the sample corpus at seq {seq} took over {timeout:.0f} s (--corpus-timeout)"
    if proc.returncode != 0:
        return f"building the sample corpus at seq {seq} failed: {proc.stderr.strip()[-2000:]}"
    print(f"sample corpus at seq {seq}: {proc.stdout.strip().splitlines()[-1]} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return None


def compiler_missing() -> str | None:
    """Why torch.compile (inductor) cannot build kernels on this host, or None: it needs a C
    compiler and the Python headers."""
    import sysconfig

    if not any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc):
        return "no C compiler (cc/gcc/clang) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return f"no Python headers ({sysconfig.get_paths()['include']}/Python.h; install python3-dev)"
    return None


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-kind", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda when a GPU is visible, else cpu (a smoke run: fp32, no MFU)")
    p.add_argument("--quick", action="store_true",
                   help="20 steps (one timed ScTD interval), no gradient accumulation")
    p.add_argument("--seqs", type=lambda s: parse_int_list(s, "--seqs"), default=[128, 512])
    p.add_argument("--modes", default=",".join(MODES), help="subset of none,vanilla,sctd")
    p.add_argument("--tp", type=lambda s: parse_int_list(s, "--tp"), default=None,
                   help="TP sizes (default: 1, plus 2 when >= 2 GPUs are visible)")
    p.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                   help="run TP > 1 without sequence parallelism")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--train-iters", type=int, default=None, help="steps per arm (default 30; --quick 20)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the numbers")
    p.add_argument("--micro-batch", type=lambda s: parse_per_seq(s, "--micro-batch"),
                   default=os.environ.get(ENV_MICRO),
                   help=f"per-GPU micro-batch, N or SEQ:N,... (env {ENV_MICRO}; default GPU "
                        f"128:64,512:16, CPU {CPU_MICRO_BATCH})")
    p.add_argument("--global-batch", type=int, default=os.environ.get(ENV_GLOBAL),
                   help=f"global batch (env {ENV_GLOBAL}; default GPU {GPU_GLOBAL_BATCH}, "
                        "CPU / --quick: one micro-batch per rank)")
    p.add_argument("--archs", default=None,
                   help="bert, modernbert or both (train.py --arch; default: both on a GPU, bert on a CPU)")
    p.add_argument("--model", choices=sorted(PRESETS), default="large",
                   help="model preset of each architecture (tiny for a CPU smoke run)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"model vocabulary (default: each architecture's released one, {ARCH_VOCAB}; "
                        "not the sample tokenizer's 8192)")
    p.add_argument("--ds-config", type=Path, default=None,
                   help="DeepSpeed JSON (default: ds_configs/zero2_bf16.json on GPU, cpu_tiny.json on CPU)")
    p.add_argument("--compile-modes", default=None,
                   help="eager, compiled or eager,compiled (train.py --compile); default: both on "
                        "a GPU, eager on a CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run, installation included (default: "
                        f"{ONE_SHOT_BUDGET_S:.0f} s with --quick, none otherwise); arms that no "
                        "longer fit are recorded as skipped")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu.json")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write gpu.json and gpu.md (the table and the goals) into this folder")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "gpu_bench",
                   help="run logs (and the data cache unless --data-cache)")
    p.add_argument("--data-cache", type=Path, default=None,
                   help="where train.py builds the sample corpus (default: WORK_DIR/data_cache)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per arm (default 3600; --quick: 240 eager, 360 compiled)")
    p.add_argument("--corpus-timeout", type=float, default=CORPUS_TIMEOUT_S,
                   help="seconds to build the sample corpus at one sequence length")
    return p


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, str, dict[str, Any]]:
    """Parse and validate the flags; resolve the device kind and the per-kind defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes must be a subset of {','.join(MODES)}, got {args.modes}")
    probe = probe_gpus() if args.device_kind != "cpu" else {"count": 0, "names": [], "cuda": None}
    kind = args.device_kind
    if kind == "auto":
        kind = "cuda" if probe["count"] > 0 else "cpu"
    if kind == "cuda" and probe["count"] == 0:
        p.error(f"--device-kind cuda but no GPU is visible {probe.get('probe_error', '')}")
    if args.tp is None:
        args.tp = [1, 2] if kind == "cuda" and probe["count"] >= 2 else [1]
    archs = args.archs or ("bert,modernbert" if kind == "cuda" else "bert")
    args.archs = list(dict.fromkeys(a.strip() for a in archs.split(",") if a.strip()))
    if not args.archs or set(args.archs) - set(ARCHS):
        p.error(f"--archs must be a subset of {','.join(ARCHS)}, got {archs!r}")
    if args.train_iters is None:
        args.train_iters = 20 if args.quick else 30
    if not 0 <= args.warmup < args.train_iters:
        p.error(f"--warmup must be in [0, --train-iters), got {args.warmup} and {args.train_iters}")
    if "sctd" in args.modes and (args.warmup % SCTD_INTERVAL or (args.train_iters - args.warmup) % SCTD_INTERVAL):
        # ScTD's consistency step comes every 10th step: a window of whole intervals weighs it as
        # training does, and matches the interval-averaged theoretical ratio.
        p.error(f"with sctd the timed steps must be whole ScTD intervals of {SCTD_INTERVAL}: "
                f"--warmup and --train-iters minus --warmup must be multiples of {SCTD_INTERVAL} "
                f"(got {args.warmup}, {args.train_iters})")
    compile_modes = args.compile_modes or ("eager,compiled" if kind == "cuda" else "eager")
    words = [w.strip() for w in compile_modes.split(",") if w.strip()]
    if not words or set(words) - {"eager", "compiled"}:
        p.error(f"--compile-modes must be eager, compiled or both, got {compile_modes!r}")
    args.compile_modes = [w == "compiled" for w in dict.fromkeys(words)]
    args.compile_fallback = compiler_missing() if True in args.compile_modes else None
    if args.compile_fallback:  # compiled arms would fail in their first step: eager only
        print(f"compiled arms left out, eager only: {args.compile_fallback}", file=sys.stderr)
        args.compile_modes = [False]
    if args.budget_s is None:
        args.budget_s = ONE_SHOT_BUDGET_S if args.quick else float("inf")
    if args.out_dir is not None:
        args.out = args.out_dir / "gpu.json"
    if args.ds_config is None:
        args.ds_config = REPO_ROOT / "ds_configs" / ("zero2_bf16.json" if kind == "cuda" else "cpu_tiny.json")
    args.ds_config = args.ds_config.resolve()
    if not args.ds_config.is_file():
        p.error(f"--ds-config {args.ds_config} does not exist")
    args.work_dir = args.work_dir.resolve()
    args.data_cache = (args.data_cache or args.work_dir / "data_cache").resolve()
    args.out = args.out.resolve()
    return args, kind, probe


def main(argv: list[str] | None = None) -> int:
    """Run every arm, write the JSON after each one, print the table; 1 if any arm failed."""
    args, kind, probe = parse(argv)
    budget = Budget(args.budget_s, float(os.environ.get(ENV_START) or time.time()))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_configs = {arch: args.work_dir / f"model_config_{arch}.json" for arch in args.archs}
    for arch, path in model_configs.items():
        path.write_text(json.dumps({"vocab_size": vocab_size(args, arch)}))
    # environment() would name the device through torch.cuda, i.e. create a CUDA context here;
    # it is given the CPU and the GPU fields come from the probe instead.
    env = environment(args, torch.device("cpu"))
    dev = probe["names"][0] if kind == "cuda" else device_name(torch.device("cpu"))
    env.update(device_type=kind, device=dev, gpus=probe["names"], cuda=probe.get("cuda"))
    arms = build_arms(args, kind, probe["count"])
    payload: dict[str, Any] = {
        "benchmark": "gpu_throughput", "complete": False, "command": env["command"],
        "device": dev, "device_kind": kind, "gpus_visible": probe["count"],
        "peak_tflops": peak_tflops(dev) if kind == "cuda" else None,
        "environment": env,
        "settings": {
            "model": args.model, "archs": args.archs,
            "model_overrides": {arch: {"vocab_size": vocab_size(args, arch)} for arch in args.archs},
            "ds_config": str(args.ds_config.relative_to(REPO_ROOT) if args.ds_config.is_relative_to(REPO_ROOT)
                             else args.ds_config),
            "precision": precision_of(args.ds_config), "train_iters": args.train_iters,
            "warmup_steps": args.warmup, "timed_steps": args.train_iters - args.warmup,
            "keep_ratio": KEEP_RATIO, "sctd_interval": SCTD_INTERVAL, "mask_fraction": MASK_FRACTION,
            "sequence_parallel_when_tp_gt_1": args.sequence_parallel,
            "activation_checkpointing": args.activation_checkpointing, "quick": args.quick,
            "compile_modes": ["compiled" if c else "eager" for c in args.compile_modes],
            "compile_fallback": args.compile_fallback,
            "budget_s": args.budget_s if args.budget_s != float("inf") else None,
            "work_dir": str(args.work_dir), "data_cache": str(args.data_cache),
        },
        "arms": arms,
    }
    print(f"{len(arms)} arms on {dev} ({kind}), {args.train_iters} steps each, first {args.warmup} untimed"
          + (f", {budget.left():.0f} s of budget left" if budget.seconds != float("inf") else ""),
          flush=True)
    corpus: dict[int, str | None] = {}
    for i, arm in enumerate(arms, 1):
        seq = arm["seq_length"]
        if seq not in corpus and not arm.get("skip_reason") and budget.fits(arm["compile"]):
            corpus[seq] = prepare_data(args.data_cache, seq, min(args.corpus_timeout, max(1.0, budget.left())))
        if corpus.get(seq):
            arm["skip_reason"] = corpus[seq]
        print(f"[{i}/{len(arms)}] {arm['name']} ...", end=" ", flush=True)
        run_arm(arm, args, model_configs[arm["arch"]], kind, budget)
        add_comparisons(arms)
        if arm["status"] == "ok":
            print(f"{arm['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {_pct(arm['mfu'])}, "
                  f"attention {arm.get('sdpa_backend')} ({arm['wall_s']:.0f} s)", flush=True)
        else:
            print(f"{arm['status'].upper()}: "
                  f"{arm['error'].strip().splitlines()[-1] if arm['error'].strip() else ''}", flush=True)
        write_json_atomic(args.out, payload)  # a crash later on keeps what is done
    failed = [a["name"] for a in arms if a["status"] == "failed"]
    skipped = [a["name"] for a in arms if a["status"] == "skipped"]
    payload.update(complete=True, failed_arms=failed, skipped_arms=skipped, goals=goals(arms),
                   table=table(arms), wall_s=time.time() - budget.t0)
    write_json_atomic(args.out, payload)
    report = payload["table"] + "\n\n" + "\n".join(
        f"{ {True: 'PASS', False: 'FAIL', None: 'n/a'}[g['pass']]:4}  {g['goal']}" for g in payload["goals"])
    if args.out_dir is not None:
        (args.out_dir / "gpu.md").write_text(f"{dev}, {payload['wall_s']:.0f} s in all\n\n{report}\n")
    print()
    print(report)
    if skipped:
        print(f"skipped for the time budget: {', '.join(skipped)}")
    print(f"\nwrote {args.out}")
    if failed:
        print(f"failed arms: {', '.join(failed)} (errors in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
