"""`initialize` forms the same groups whichever launcher started the ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.distributed import free_port
from tests.training.launch import REPO

# Each rank writes its own file: the ranks' stdout lines can interleave under mpirun.
PROBE = """
import json, os, torch, torch.distributed as dist
from sctd_dist.parallel import initialize
ctx = initialize(2)
x = torch.tensor([float(dist.get_rank())])
dist.all_reduce(x, group=ctx.tp_group)
record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "tp_rank": ctx.tp_rank,
          "dp_rank": ctx.dp_rank, "tp_sum": x.item()}
with open(os.path.join(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump(record, fh)
"""


def _records(out_dir) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")),
                  key=lambda r: r["rank"])


def _env(out_dir) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PROBE_OUT=str(out_dir))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_mpirun_discovery(tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "OpenMPI is installed by `make setup`"
    env = _env(tmp_path)
    p = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "4",
                        "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "OMP_NUM_THREADS", "-x", "PROBE_OUT",
                        sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = _records(tmp_path)
    assert [r["rank"] for r in recs] == [0, 1, 2, 3] and all(r["world"] == 4 for r in recs)
    # TP groups are consecutive ranks: {0,1} and {2,3}.
    assert [r["tp_rank"] for r in recs] == [0, 1, 0, 1]
    assert [r["dp_rank"] for r in recs] == [0, 0, 1, 1]
    assert [r["tp_sum"] for r in recs] == [1.0, 1.0, 5.0, 5.0]


def test_slurm_variables_start_a_job(tmp_path):
    """Two processes with only SLURM_* variables (as `srun` sets them) form one job."""
    env = _env(tmp_path)
    env.pop("MASTER_ADDR")
    env.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="4242")
    procs = []
    for r in (0, 1):
        e = dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r))
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in outs]
    recs = _records(tmp_path)
    assert [r["rank"] for r in recs] == [0, 1]
    assert [r["tp_rank"] for r in recs] == [0, 1] and all(r["tp_sum"] == 1.0 for r in recs)
