"""Stand-ins for `sbatch`, `srun` and `scontrol` that run a SLURM job on this machine.

Each "node" of the fake allocation is 127.0.0.1. The stand-ins only do what SLURM does around the
real processes, nothing more:

- `sbatch SCRIPT` copies the script to a spool folder (as slurmd does, so the script cannot find
  its checkout through its own path), sets the batch environment (SLURM_JOB_ID, SLURM_JOB_NAME,
  SLURM_NNODES, SLURM_JOB_NODELIST, SLURM_SUBMIT_DIR, SLURM_RESTART_COUNT, ...) and execs the
  script in the foreground: its pid is the batch shell, the process SLURM's `--signal=B:...`
  signals. A requeue is "run sbatch again with SLURM_RESTART_COUNT=N".
- `srun` starts one process per task of the step (tasks per node x nodes) with the task's
  SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID/..., each in a session of its own like slurmstepd's
  tasks. Signals it receives go to each task's process group (the weakest delivery SLURM's
  process-tracking plugins give: processes that started sessions of their own, such as
  torchrun's workers, are not reached directly). With --kill-on-bad-exit a failing task kills the
  step; when the step ends, processes it left behind are killed (SLURM's cgroup cleanup) and
  counted in the log.
- `scontrol show hostnames LIST` prints one host per line; `scontrol requeue ID` records the
  request in the log.

Everything they do is appended, one JSON object per line, to $FAKE_SLURM_LOG.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SRUN = r'''#!__PYTHON__
import json, os, signal, subprocess, sys, time

import psutil

LOG = os.environ["FAKE_SLURM_LOG"]


def log(**rec):
    with open(LOG, "a") as fh:
        fh.write(json.dumps({"tool": "srun", "time": time.time(), **rec}) + "\n")


def fail(msg):
    print(f"srun (fake): {msg}", file=sys.stderr)
    log(error=msg)
    sys.exit(2)


VALUE = {"-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks",
         "--ntasks-per-node": "ntasks_per_node", "-c": "cpus", "--cpus-per-task": "cpus",
         "--gpus-per-node": "gpus", "--cpu-bind": "cpu_bind", "--export": "export",
         "-J": "job_name", "--job-name": "job_name"}
FLAGS = {"-K": "kill_on_bad_exit", "--kill-on-bad-exit": "kill_on_bad_exit", "-l": "label",
         "--label": "label", "-u": "unbuffered", "--unbuffered": "unbuffered"}
argv = sys.argv[1:]
opts = {}
while argv and argv[0].startswith("-"):
    arg = argv.pop(0)
    name, eq, value = arg.partition("=")
    if name in FLAGS:
        opts[FLAGS[name]] = value if eq else "1"
    elif name in VALUE:
        opts[VALUE[name]] = value if eq else argv.pop(0)
    elif name.startswith("--container"):
        fail(f"{name}: containers are not simulated")
    else:
        fail(f"unsupported option {arg}")
if not argv:
    fail("no command")
log(argv=sys.argv[1:])

hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
nodes = int(opts.get("nodes", os.environ.get("SLURM_NNODES", len(hosts))))
if nodes > len(hosts):
    fail(f"{nodes} nodes requested, the allocation has {len(hosts)}")
ntasks = int(opts["ntasks"]) if "ntasks" in opts else None
per_node = int(opts["ntasks_per_node"]) if "ntasks_per_node" in opts else None
if per_node is None:
    per_node = -(-(ntasks or nodes) // nodes)
if ntasks is None:
    ntasks = per_node * nodes
if ntasks != per_node * nodes:
    fail(f"--ntasks {ntasks} is not {nodes} nodes x {per_node} tasks")
step_id = os.environ.get("FAKE_SLURM_STEP", "0")
step_hosts = ",".join(hosts[:nodes])

tasks = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks),
                   SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NUM_NODES=str(nodes),
                   SLURM_STEP_NODELIST=step_hosts, SLURM_STEP_ID=step_id, SLURM_STEPID=step_id,
                   SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURMD_NODENAME=hosts[node])
        tasks.append(subprocess.Popen(argv, env=env, start_new_session=True))


def forward(signum, frame):
    log(signal=signal.Signals(signum).name)
    for t in tasks:
        if t.poll() is None:
            try:
                os.killpg(t.pid, signum)
            except ProcessLookupError:
                pass


for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
            signal.SIGQUIT, signal.SIGCONT):
    signal.signal(sig, forward)

seen = {}  # every process the step ever had (SLURM tracks them in the step's cgroup)


def track():
    for t in tasks:
        try:
            for p in psutil.Process(t.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass


def running(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(reason):
    track()
    alive = [p for p in seen.values() if running(p)]
    for t in tasks:
        if t.poll() is None:
            os.killpg(t.pid, signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if alive:
        log(killed=[p.pid for p in alive], reason=reason)
    return len(alive)


killed_step = False
while any(t.poll() is None for t in tasks):
    track()
    if (opts.get("kill_on_bad_exit", "0") != "0" and not killed_step
            and any(t.returncode not in (None, 0) for t in tasks)):
        bad = [i for i, t in enumerate(tasks) if t.returncode not in (None, 0)]
        print(f"srun (fake): task(s) {bad} exited non-zero: terminating the step", file=sys.stderr)
        log(kill_on_bad_exit=bad)
        kill_all("kill-on-bad-exit")
        killed_step = True
    time.sleep(0.1)
leftovers = kill_all("step end")
codes = [t.returncode if t.returncode >= 0 else 128 - t.returncode for t in tasks]
log(exit_codes=codes, leftovers=leftovers)
sys.exit(max(codes))
'''

SBATCH = r'''#!__PYTHON__
import json, os, re, shutil, sys, time
from pathlib import Path

argv = sys.argv[1:]
opts = {}
while argv and argv[0].startswith("-"):
    name, _, value = argv.pop(0).partition("=")
    opts[name.lstrip("-")] = value
script = Path(argv.pop(0))
for line in script.read_text().splitlines():
    m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
    if m:
        opts.setdefault(m.group(1), m.group(2) or "")
    elif line and not line.startswith("#"):
        break  # sbatch stops reading #SBATCH lines at the first command
nodes = int(opts.get("nodes", "1"))
job_id = os.environ.get("FAKE_SLURM_JOB_ID", "4242")
env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
env.update(SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NAME=opts.get("job-name", script.name),
           SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
           SLURM_JOB_NODELIST=",".join(["127.0.0.1"] * nodes), SLURM_SUBMIT_DIR=os.getcwd(),
           SLURM_CPUS_ON_NODE="1", SLURM_JOB_CPUS_PER_NODE=f"1(x{nodes})")
restart = os.environ.get("SLURM_RESTART_COUNT")
if restart:
    env["SLURM_RESTART_COUNT"] = restart
spool = Path(os.environ["FAKE_SLURM_SPOOL"]) / f"job{job_id}"
spool.mkdir(parents=True, exist_ok=True)
copy = spool / "slurm_script"
shutil.copyfile(script, copy)
copy.chmod(0o755)
with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
    fh.write(json.dumps({"tool": "sbatch", "time": time.time(), "argv": sys.argv[1:],
                         "job_id": job_id, "restart_count": restart, "pid": os.getpid()}) + "\n")
os.execve(str(copy), [str(copy), *argv], env)
'''

SCONTROL = r'''#!/bin/bash
set -euo pipefail
case "${1:-}" in
    show)
        [[ ${2:-} == hostnames ]] || { echo "scontrol (fake): unsupported: $*" >&2; exit 1; }
        tr ',' '\n' <<<"${3:-$SLURM_JOB_NODELIST}"
        ;;
    requeue)
        printf '{"tool": "scontrol", "requeue": "%s", "time": %s}\n' "$2" "$(date +%s)" >>"$FAKE_SLURM_LOG"
        ;;
    *)
        echo "scontrol (fake): unsupported: $*" >&2
        exit 1
        ;;
esac
'''


def install(bin_dir: Path) -> Path:
    """Write the three stand-ins into `bin_dir` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("sbatch", SBATCH), ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(text.replace("__PYTHON__", sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def base_env(tmp: Path) -> dict[str, str]:
    """The submitting shell's environment: the stand-ins first on PATH, no SLURM or launcher
    variables from the outside, and nothing that leaves 127.0.0.1."""
    bin_dir = install(tmp / "bin")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               FAKE_SLURM_LOG=str(tmp / "slurm.log"), FAKE_SLURM_SPOOL=str(tmp / "spool"),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHON=sys.executable)
    return env
