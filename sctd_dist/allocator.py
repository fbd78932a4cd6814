"""A tuned CPU memory allocator for the launch paths we own (`make demo`, `make bench`, the CPU
Docker image, the benchmark runners).

Training allocates and frees the same large activation and gradient tensors every step. glibc's
malloc serves large blocks with fresh `mmap`s and returns them on free, so every step pays page
faults on memory it just gave back; PyTorch's CPU performance guides recommend tcmalloc or
jemalloc for this reason. The allocator must be chosen when a process starts (`LD_PRELOAD`), so
this module prepares the environment of a command and `exec`s it:

    python -m sctd_dist.allocator -- deepspeed --num_gpus 2 sctd_dist/train.py ...

In order of preference: tcmalloc (Debian `libtcmalloc-minimal4`), jemalloc (`libjemalloc2`,
configured to keep freed pages), else glibc's malloc with its mmap path and trimming off.
`SCTD_ALLOCATOR=tcmalloc|jemalloc|glibc|system` forces a choice (`system`: change nothing).
`in_use()` says what the current process runs with (`train.py` logs it at start-up).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

ENV_CHOICE = "SCTD_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "jemalloc", "glibc", "system")

# Shared-library names, most preferred first.
_LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
_DEBIAN_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib", "/opt/homebrew/lib")

# Settings that come with each choice (never overriding what the caller already set):
_SETTINGS = {
    # tcmalloc reports every allocation above 1 GiB on stderr by default: large flat buffers
    # (DeepSpeed's, a big model's embeddings) would flood the logs.
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
    # jemalloc returns freed pages to the OS after 10 s by default; a training step frees and
    # reallocates the same sizes every step, so keep them (-1: never decay).
    "jemalloc": {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"},
    # glibc: no mmap for large blocks and no trimming of the heap top, so freed memory is reused.
    "glibc": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
              "MALLOC_TOP_PAD_": str(256 << 20)},
}


@dataclass(frozen=True)
class Allocator:
    """What a command will run with: `name` and, for a preloaded library, its path."""

    name: str  # tcmalloc, jemalloc, glibc (tuned settings) or system (untouched)
    library: str | None = None
    settings: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.library:
            return f"{self.name} ({self.library})"
        if self.name == "glibc":
            return "glibc malloc, tuned (" + " ".join(f"{k}={v}" for k, v in self.settings.items()) + ")"
        return "system default malloc"


SYSTEM = Allocator("system")  # the process's own malloc, untouched


def find_library(name: str, dirs: Sequence[str] = _LIBRARY_DIRS) -> str | None:
    """Path of the shared library of allocator `name`, searched in the usual system folders and
    this Python's own prefix (conda environments ship their own)."""
    filename = _LIBRARIES[name]
    for folder in (*dirs, os.path.join(sys.prefix, "lib")):
        hits = sorted(glob.glob(os.path.join(folder, filename)))
        if hits:
            return hits[0]
    return None


def choose(env: Mapping[str, str] | None = None) -> Allocator:
    """The allocator for a new process: the first library present, else tuned glibc malloc.

    Raises ValueError when `SCTD_ALLOCATOR` asks for something unknown or absent."""
    env = os.environ if env is None else env
    wanted = env.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"{ENV_CHOICE}={wanted!r} is not one of {', '.join(CHOICES)}")
    if wanted == "system":
        return SYSTEM
    for name in _LIBRARIES:
        if wanted in ("auto", name):
            path = find_library(name)
            if path:
                return Allocator(name, path, dict(_SETTINGS[name]))
            if wanted == name:
                raise ValueError(f"{ENV_CHOICE}={name} but {_LIBRARIES[name]} is not installed "
                                 f"(Debian: apt-get install {_DEBIAN_PACKAGES[name]})")
    return Allocator("glibc", None, dict(_SETTINGS["glibc"]))


def environment(allocator: Allocator, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) plus what `allocator` needs; settings the caller already
    made win, and an existing LD_PRELOAD is kept after the allocator."""
    out = dict(os.environ if env is None else env)
    for key, value in allocator.settings.items():
        out.setdefault(key, value)
    if allocator.library:
        preload = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p]
        if allocator.library not in preload:
            out["LD_PRELOAD"] = " ".join([allocator.library, *preload])
    return out


def in_use() -> str:
    """What this process allocates with, read from its own memory map and environment."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name, filename in _LIBRARIES.items():
        stem = filename.split(".so")[0] + ".so"
        for line in maps.splitlines():
            if stem in line:
                return f"{name} ({line.split()[-1]})"
    tuned = {k: os.environ[k] for k in _SETTINGS["glibc"] if k in os.environ}
    return (Allocator("glibc", settings=tuned) if tuned else SYSTEM).describe()


def reexec_with_tuned_allocator() -> None:
    """Restart this Python program under the tuned allocator unless it already runs with one
    (for scripts that users start directly, such as the benchmarks). Returns when nothing is to
    be done; `SCTD_ALLOCATOR=system` opts out."""
    if os.environ.get(_APPLIED) or in_use() != SYSTEM.describe():
        return
    allocator = choose()
    if allocator.name == "system":
        return
    env = environment(allocator)
    env[_APPLIED] = allocator.name  # never loop, whatever the loader did with LD_PRELOAD
    print(f"allocator: {allocator.describe()} (restarting under it)", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


_APPLIED = "SCTD_ALLOCATOR_APPLIED"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sctd_dist.allocator [--print] [--] COMMAND ...`: run COMMAND with the tuned
    allocator (say which on stderr); `--print`: only print the choice and the variables."""
    args = list(sys.argv[1:] if argv is None else argv)
    only_print = bool(args) and args[0] == "--print"
    if only_print:
        args = args[1:]
    if args and args[0] == "--":
        args = args[1:]
    try:
        allocator = choose()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = environment(allocator)
    if only_print or not args:
        print(f"allocator: {allocator.describe()}")
        for key in ("LD_PRELOAD", *allocator.settings):
            if key in env:
                print(f"{key}={env[key]}")
        return 0
    print(f"allocator: {allocator.describe()}", file=sys.stderr, flush=True)
    try:
        os.execvpe(args[0], args, env)
    except OSError as exc:
        print(f"error: cannot run {args[0]!r}: {exc}", file=sys.stderr)
        return 2
    return 0  # unreachable: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
