"""Shared helpers for the benchmark scripts: environment capture, timing, interleaving, output.

Timing rules used by every script here:
  * the arms being compared run round-robin inside one loop (order rotated every repeat), so
    background load on a shared machine hits all arms alike;
  * warmup iterations are run and discarded; the reported number is the median of the repeats;
  * on CUDA the device is synchronised before reading the clock (both ends of a timed region).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` with no install; appended, so
    sys.path.append(str(REPO_ROOT))  # an installed or PYTHONPATH sctd_dist takes precedence

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*APEX is not installed.*")
warnings.filterwarnings("ignore", message=".*tp_group is None.*")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch.get_num_threads(), i.e. all cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few repeats")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results/<name>.json)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the JSON")


def use_tuned_allocator() -> None:
    """Restart this benchmark under the tuned CPU allocator (`sctd_dist.allocator`) when it was
    started without one; every arm of a script then runs under the same allocator."""
    from sctd_dist.allocator import reexec_with_tuned_allocator

    reexec_with_tuned_allocator()


def setup_torch(args) -> torch.device:
    """Apply --threads and --device; returns the device."""
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    args.threads = threads
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(device.index or 0)
        torch.backends.cuda.matmul.allow_tf32 = False  # compare true fp32 on both arms
        torch.backends.cudnn.allow_tf32 = False
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The SIMD flags that decide CPU matmul speed (avx2/avx512/amx, bf16 support)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def environment(args, device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_type": device.type,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "os_cpu_count": os.cpu_count(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "pythonpath_env": os.environ.get("PYTHONPATH"),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "allocator": allocator_in_use(),
        "quick": bool(args.quick),
    }
    env.update(source_tree())
    if device.type == "cpu":
        env["cpu_flags"] = cpu_flags()
        env["mkldnn_bf16_supported"] = bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
    else:
        env["cuda"] = torch.version.cuda
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    return env


def allocator_in_use() -> str:
    from sctd_dist.allocator import in_use

    return in_use()


def source_tree() -> dict[str, Any]:
    """Which sctd_dist is benchmarked: its path, the git commit and whether it has local edits."""
    import subprocess

    import sctd_dist

    root = Path(sctd_dist.__file__).resolve().parent.parent
    info: dict[str, Any] = {"sctd_dist_path": str(root)}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sctd_dist"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.splitlines()
        info["sctd_dist_uncommitted_files"] = dirty
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of fn() in seconds, synchronising the device at both ends."""
    return timed2(fn, device)[0]


def timed2(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(), synchronising the device at both ends.

    Process CPU time (all threads) is a second view that is less sensitive to other processes
    competing for the cores (it still includes OpenMP spin-waiting)."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def rotate(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def interleaved(arms: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device, cpu_times: dict[str, list[float]] | None = None
                ) -> dict[str, list[float]]:
    """Time each arm `repeats` times, round-robin, order rotated per repeat; returns raw wall
    times per arm (and fills `cpu_times` with the process CPU times when given)."""
    names = list(arms)
    for w in range(warmup):
        for name in rotate(names, w):
            arms[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotate(names, r):
            wall, cpu = timed2(arms[name], device)
            times[name].append(wall)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(cpu)
    return times


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    m = median(xs)
    return float((max(xs) - min(xs)) / m) if m else 0.0


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file in the same folder and rename, so a reader (or a crash) never
    sees half a file."""
    from sctd_dist.coordination import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


def plain_settings(args) -> dict[str, Any]:
    """The parsed flags as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def save_figures(figures: list, paths: list[Path]) -> list[Path]:
    """Write each matplotlib figure to its PNG path and close it; returns the paths."""
    import matplotlib.pyplot as plt

    for fig, path in zip(figures, paths):
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths


def write_json(args, name: str, payload: dict[str, Any]) -> Path | None:
    """Write a benchmark's results (to --out, else results/<name>.json) and say where; nothing
    with --no-write."""
    if args.no_write:
        return None
    path = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    write_json_atomic(path, payload)
    print(f"wrote {path}")
    return path


def init_single_process():
    """The single-process parallel context (in-memory store) our model needs at TP=1."""
    from sctd_dist.parallel import initialize

    return initialize(1)


def mlm_batch(batch: int, seq: int, vocab: int, mask_frac: float, device: torch.device,
              seed: int, mask_id: int = 4, first_regular_id: int = 5,
              cls_id: int = 2, sep_id: int = 3) -> dict[str, torch.Tensor]:
    """A packed (no padding) MLM batch: [CLS] ... [SEP], exactly round(mask_frac*(seq-2))
    predicted positions per sequence, [MASK] in the input there, labels -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_regular_id, vocab, (batch, seq), generator=g)
    ids[:, 0] = cls_id
    ids[:, -1] = sep_id
    n_mask = max(1, round(mask_frac * (seq - 2)))
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    inputs = ids.clone()
    for b in range(batch):
        pos = torch.randperm(seq - 2, generator=g)[:n_mask] + 1
        labels[b, pos] = ids[b, pos]
        inputs[b, pos] = mask_id
    return {
        "input_ids": inputs.to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long, device=device),
        "labels": labels.to(device),
    }
