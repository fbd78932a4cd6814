"""slurm/pretrain_base.sh on a real SLURM cluster (tests/launchers/slurm_cluster.py: slurmctld,
two slurmd in network namespaces of their own, munge), CPU ranks, the tiny model.

What a stand-in cannot show: real task launch and signal delivery, `scontrol requeue`, the time
limit's SIGTERM, a rank that hangs and a node lost mid-run. Where the machine cannot run the
cluster (not root, no namespaces, SLURM not installed) the tests fail with the reason.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from sctd_dist import checkpoint
from sctd_dist.run_lock import LOCK_FILE
from tests.conftest import SEQ
from tests.launchers import slurm_cluster

REPO = Path(__file__).resolve().parents[2]
DIST_TIMEOUT_S = 20
NODE_LOSS_LIMIT_S = 90  # a lost node ends the job within this (gloo sees the peer go at once)
END_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster():
    try:
        c = slurm_cluster.start_cluster()
    except slurm_cluster.ClusterError as exc:
        pytest.fail(f"no SLURM cluster on this machine: {exc}")
    yield c
    c.stop()


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def steps(recs: list[dict]) -> list[int]:
    return [r["step"] for r in recs if "event" not in r and "loss" in r]


def events(recs: list[dict], kind: str) -> list[dict]:
    return [r for r in recs if r.get("event") == kind]


def job_env(cluster, tmp: Path, data_dir, iters: int, save_interval: int) -> dict[str, str]:
    return cluster.env({
        "MODEL": "tiny", "TRAIN_ITERS": str(iters), "SEQ_LENGTH": str(SEQ), "GPUS_PER_NODE": "1",
        "DS_CONFIG": str(REPO / "ds_configs" / "cpu_tiny.json"), "DATA_PATH": str(data_dir),
        "SAVE_DIR": str(tmp / "ckpt"), "LOG_DIR": str(tmp / "logs"), "GLOBAL_BATCH_SIZE": "4",
        "MICRO_BATCH_SIZE": "2", "EVAL_ITERS": "0", "SAVE_INTERVAL": str(save_interval),
        "SHUTDOWN_TIMEOUT": "30", "SCTD_ROOT": str(REPO),
        "EXTRA_ARGS": f"--sctd-interval 4 --dist-timeout {DIST_TIMEOUT_S}"})


def submit(cluster, tmp: Path, env: dict[str, str], *args: str) -> str:
    return cluster.sbatch(str(REPO / "slurm" / "pretrain_base.sh"), "--gpus-per-node=0",
                          f"--output={tmp}/slurm-%j.out", *args, env=env, cwd=REPO)


def wait_for(what, predicate, cluster, job_id: str, tmp: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        state = cluster.job_state(job_id)
        if state in END_STATES:
            raise AssertionError(f"job {job_id} ended ({state}) before {what}:\n{slurm_out(tmp, job_id)[-6000:]}")
        if time.monotonic() > deadline:
            cluster.client("scancel", job_id, check=False)
            raise AssertionError(f"no {what} within {timeout} s (job {job_id} {state}):\n"
                                 f"{slurm_out(tmp, job_id)[-6000:]}")
        time.sleep(0.3)


def slurm_out(tmp: Path, job_id: str) -> str:
    path = tmp / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def test_preempted_requeued_resumed_then_time_limit(cluster, tmp_path, data_dir):
    """USR1 to the batch shell (what --signal=B:USR1@N sends; its timing is coarse, so the test
    sends it itself): save, `scontrol requeue`, the requeued attempt resumes at exactly that step.
    That attempt then runs into its time limit, lowered to 1 minute (SLURM's least) under the
    running job: SIGTERM, a checkpoint, no requeue. `--signal=B:USR1@0` keeps the script's own
    warning signal out of the way of the time limit."""
    env = job_env(cluster, tmp_path, data_dir, iters=100000, save_interval=100000)
    job = submit(cluster, tmp_path, env, "--nodes=2", "--time=10", "--signal=B:USR1@0")
    metrics = tmp_path / "logs" / f"sctd-bert-base-{job}" / "train" / "metrics.jsonl"
    wait_for("training", lambda: len(steps(records(metrics))) >= 2, cluster, job, tmp_path)
    cluster.client("scancel", "--batch", "--signal=USR1", job)
    # The requeued attempt: the same job id, SLURM_RESTART_COUNT 1, resumes from the checkpoint.
    wait_for("the requeued attempt's resume", lambda: events(records(metrics), "resume"), cluster, job,
             tmp_path)
    recs = records(metrics)
    (preempted,) = events(recs, "preempted")
    stop = preempted["step"]
    assert preempted["saved"] and stop >= 2
    resume = events(recs, "resume")[0]
    assert resume["step"] == stop and resume["checkpoint"] == checkpoint.tag_for(stop)
    assert resume["consumed_samples"] == stop * 4
    run_dir = metrics.parent.parent
    assert (run_dir / "requeue.attempt0").is_file() and (run_dir / "nodes.attempt1.txt").is_file()

    cluster.client("scontrol", "update", f"JobId={job}", "TimeLimit=1")
    state = cluster.wait_job(job, END_STATES, timeout=150)
    out = slurm_out(tmp_path, job)
    assert state == "TIMEOUT" and "DUE TO TIME LIMIT" in out, out[-4000:]
    recs = records(metrics)
    last = events(recs, "preempted")[-1]
    assert last["saved"] and last["step"] > stop, out[-4000:]
    assert checkpoint.latest_tag(tmp_path / "ckpt") == checkpoint.tag_for(last["step"])
    assert steps(recs) == list(range(last["step"])), "every step exactly once, in order"
    assert "received SIGTERM" in (run_dir / "events.log").read_text()
    assert not (run_dir / "requeue.attempt1").exists()  # a time limit is not a preemption
    assert not (tmp_path / "ckpt" / LOCK_FILE).exists()  # released at exit


def test_hung_rank_then_lost_node_then_resume_on_one_node(cluster, tmp_path, data_dir):
    """A SIGSTOPped rank ends the job within --dist-timeout with one line naming the step and the
    collective; a node lost mid-run (its slurmd and tasks killed) ends the job with a line naming
    the peer that went away; a resubmission on the remaining node resumes at DP=1."""
    env = job_env(cluster, tmp_path, data_dir, iters=100000, save_interval=2)
    save = tmp_path / "ckpt"

    # 1. A hang: stop the rank on node2; the job must end by the timeout, not at its time limit.
    job = submit(cluster, tmp_path, env, "--nodes=2", "--time=10")
    metrics = tmp_path / "logs" / f"sctd-bert-base-{job}" / "train" / "metrics.jsonl"
    wait_for("a checkpoint", lambda: checkpoint.latest_tag(save) is not None, cluster, job, tmp_path)
    assert cluster.signal_tasks("node2", "train.py", "STOP")
    t0 = time.monotonic()
    state = cluster.wait_job(job, END_STATES, timeout=DIST_TIMEOUT_S + 120)
    elapsed = time.monotonic() - t0
    out = slurm_out(tmp_path, job)
    assert state == "FAILED", out[-4000:]
    lines = re.findall(rf"error: rank \d+ at step \d+: \w+ did not complete within --dist-timeout "
                       rf"{DIST_TIMEOUT_S} s[^\n]*", out)
    # One line from the rank that waited; SLURM's SIGCONT before its SIGTERM can wake the stopped
    # rank, whose own collective then times out too and says so.
    assert 1 <= len(lines) <= 2, out[-6000:]
    assert DIST_TIMEOUT_S - 5 <= elapsed <= DIST_TIMEOUT_S + 90, elapsed
    cluster.signal_tasks("node2", "train.py", "KILL")  # left stopped by the failed step
    cluster.wait_idle(["node1", "node2"], 60)

    # 2. The same job submitted again resumes (the dead attempt's lock is taken over or was
    # released); once it has saved again, node2 is lost.
    job = submit(cluster, tmp_path, env, "--nodes=2", "--time=10")
    metrics = tmp_path / "logs" / f"sctd-bert-base-{job}" / "train" / "metrics.jsonl"
    wait_for("a resumed checkpoint", lambda: events(records(metrics), "checkpoint"), cluster, job, tmp_path)
    cluster.kill_node("node2")
    t0 = time.monotonic()

    def attempt_over() -> bool:  # ended, or requeued by SLURM for the node failure (--requeue)
        state = cluster.job_state(job)
        return state in END_STATES or state == "PENDING" and int(cluster.job_field(job, "Restarts") or 0) > 0

    deadline = t0 + NODE_LOSS_LIMIT_S
    while not attempt_over():
        assert time.monotonic() < deadline, f"job {job} still runs {NODE_LOSS_LIMIT_S} s after node2 was lost"
        time.sleep(0.5)
    out = slurm_out(tmp_path, job)
    assert re.search(r"error: rank \d+ at step \d+: \w+ failed because another rank went away \(peer node2, "
                     r"10\.241\.0\.12\)", out) or "Node failure on node2" in out, out[-6000:]
    cluster.client("scancel", job)  # the requeued job would wait for node2; resubmit on node1
    cluster.wait_job(job, ("CANCELLED",), timeout=60)
    cluster.wait_idle(["node1"], 60)
    before = int(checkpoint.latest_tag(save).removeprefix("global_step"))

    # 3. Resubmitted on the one node left: resumes from the newest checkpoint at TP=1 x DP=1.
    env1 = dict(env, TRAIN_ITERS=str(before + 4))
    job = submit(cluster, tmp_path, env1, "--nodes=1", "--nodelist=node1", "--time=10")
    state = cluster.wait_job(job, END_STATES, timeout=240)
    assert state == "COMPLETED", slurm_out(tmp_path, job)[-6000:]
    recs = records(tmp_path / "logs" / f"sctd-bert-base-{job}" / "train" / "metrics.jsonl")
    (resume,) = events(recs, "resume")
    assert resume["step"] == before and resume["dp_size"] == 1
    (layout,) = events(recs, "layout_change")
    assert layout["saved_dp_size"] == 2 and layout["dp_size"] == 1
    assert checkpoint.latest_tag(save) == checkpoint.tag_for(before + 4)
