"""`initialize` forms the same groups whichever launcher started the ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.distributed import free_port
from tests.training.launch import REPO

PROBE = """
import json, torch, torch.distributed as dist
from sctd_dist.parallel import initialize
ctx = initialize(2)
x = torch.tensor([float(dist.get_rank())])
dist.all_reduce(x, group=ctx.tp_group)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "tp_rank": ctx.tp_rank,
                  "dp_rank": ctx.dp_rank, "tp_sum": x.item()}))
"""


def _records(out: str) -> list[dict]:
    return sorted((json.loads(l) for l in out.splitlines() if l.startswith("{")), key=lambda r: r["rank"])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_mpirun_discovery():
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make setup`"
    env = _env()
    p = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "4",
                        "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS",
                        sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = _records(p.stdout)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3] and all(r["world"] == 4 for r in recs)
    # TP groups are consecutive ranks: {0,1} and {2,3}.
    assert [r["tp_rank"] for r in recs] == [0, 1, 0, 1]
    assert [r["dp_rank"] for r in recs] == [0, 0, 1, 1]
    assert [r["tp_sum"] for r in recs] == [1.0, 1.0, 5.0, 5.0]


def test_slurm_variables_start_a_job():
    """Two processes with only SLURM_* variables (as `srun` sets them) form one job."""
    env = _env()
    env.pop("MASTER_ADDR")
    env.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="4242")
    procs = []
    for r in (0, 1):
        e = dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in outs]
    recs = _records("".join(o for o, _ in outs))
    assert [r["rank"] for r in recs] == [0, 1]
    assert [r["tp_rank"] for r in recs] == [0, 1] and all(r["tp_sum"] == 1.0 for r in recs)
