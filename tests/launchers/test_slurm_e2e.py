"""The SLURM scripts, unmodified, run as SLURM would run them: 2 "nodes" on localhost, CPU ranks.

Only sbatch/srun/scontrol are stand-ins (tests/launchers/fake_slurm.py); the batch script, srun's
tasks (torchrun with a c10d rendezvous, or the workers themselves with LAUNCHER=srun), and
sctd_dist/train.py are real. For pretrain_base.sh, SIGUSR1 goes to the batch shell, as
`#SBATCH --signal=B:USR1@...` does: the script must forward it to the workers, get a checkpoint,
request a requeue, and the requeued run must resume from that checkpoint and finish. For
pretrain_large.sh, phase 2 must start from phase 1's final checkpoint at a longer sequence length.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sctd_dist import checkpoint
from tests.conftest import SEQ
from tests.distributed import free_port
from tests.launchers import fake_slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_ITERS = 30
JOB_ID = "4242"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(recs: list[dict], kind: str) -> list[dict]:
    return [r for r in recs if r.get("event") == kind]


def records_so_far(path: Path) -> list[dict]:
    """Records of a file still being written (a last line may be incomplete)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def steps(recs: list[dict]) -> list[int]:
    return [r["step"] for r in recs if "event" not in r and "loss" in r]


def submit(env: dict[str, str], script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(Path(env["FAKE_SLURM_LOG"]).parent / "bin" / "sbatch"), *args, script],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"job timed out:\n{out[-8000:]}")
    return out


@pytest.fixture
def job_env(tmp_path, data_dir):
    env = fake_slurm.base_env(tmp_path)
    env.update(FAKE_SLURM_JOB_ID=JOB_ID, MODEL="tiny", TRAIN_ITERS=str(TRAIN_ITERS),
               SEQ_LENGTH=str(SEQ), DS_CONFIG="ds_configs/cpu_tiny.json", GPUS_PER_NODE="1",
               DATA_PATH=str(data_dir), SAVE_DIR=str(tmp_path / "ckpt"), LOG_DIR=str(tmp_path / "logs"),
               EXTRA_ARGS="--global-batch-size 4 --micro-batch-size 2 --sctd-interval 4",
               EVAL_ITERS="0", SAVE_INTERVAL="1000",
               MASTER_PORT=str(free_port()), TORCHRUN_ARGS="--local-addr 127.0.0.1")
    return env


def test_base_script_preempted_requeued_resumed(job_env, tmp_path):
    t0 = time.monotonic()
    run_dir = tmp_path / "logs" / f"sctd-bert-base-{JOB_ID}"
    metrics = run_dir / "train" / "metrics.jsonl"
    save = tmp_path / "ckpt"
    slurm_log = tmp_path / "slurm.log"

    # Attempt 0: signal the batch shell once training is under way.
    proc = submit(job_env, "slurm/pretrain_base.sh", "--nodes=2")
    deadline = time.monotonic() + 150
    while not steps(records_so_far(metrics)):
        if proc.poll() is not None:
            raise AssertionError(f"job ended before training started:\n{proc.stdout.read()[-8000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("training did not start")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # the batch shell only, like --signal=B:USR1
    out = finish(proc, 120)
    t1 = time.monotonic()
    assert proc.returncode == 0, out[-8000:]

    recs = records(metrics)
    preempted = events(recs, "preempted")
    assert len(preempted) == 1 and preempted[0]["saved"], out[-8000:]
    stop = preempted[0]["step"]
    assert 0 < stop < TRAIN_ITERS
    assert checkpoint.latest_tag(save) == checkpoint.tag_for(stop)
    summary = events(recs, "summary")[-1]
    assert summary["preempted"] and summary["steps"] == stop
    log = fake_slurm.read_log(slurm_log)
    assert [r["requeue"] for r in log if "requeue" in r] == [JOB_ID]
    assert any(r.get("signal") == "SIGUSR1" for r in log if r["tool"] == "srun"), "srun got no SIGUSR1"
    # torchrun exits 1 after forwarding a signal, so with --kill-on-bad-exit srun may kill the other
    # node's task; harmless, as no rank leaves a checkpoint save before every rank has written.
    # The run folder: DeepSpeed JSON, the full command, the batch script's own record.
    assert json.loads((run_dir / "train" / "ds_config.json").read_text()) == \
        json.loads((REPO / "ds_configs" / "cpu_tiny.json").read_text())
    command = (run_dir / "train" / "command.sh").read_text()
    assert "torch.distributed.run" in command and "--rdzv_backend=c10d" in command
    assert f"--rdzv_id={JOB_ID}" in command and "SIGUSR1" in command
    assert "received SIGUSR1" in (run_dir / "events.log").read_text()
    assert (run_dir / "requeue.attempt0").is_file()

    # Attempt 1: SLURM runs the same script again under the same job id.
    proc = submit(dict(job_env, SLURM_RESTART_COUNT="1"), "slurm/pretrain_base.sh", "--nodes=2")
    out = finish(proc, 180)
    t2 = time.monotonic()
    assert proc.returncode == 0, out[-8000:]
    recs = records(metrics)
    resume = events(recs, "resume")
    assert len(resume) == 1 and resume[0]["step"] == stop, out[-8000:]
    assert resume[0]["checkpoint"] == checkpoint.tag_for(stop)
    summary = events(recs, "summary")[-1]
    assert not summary["preempted"] and summary["steps"] == TRAIN_ITERS
    assert sorted(steps(recs)) == list(range(TRAIN_ITERS))  # every step exactly once
    assert checkpoint.latest_tag(save) == checkpoint.tag_for(TRAIN_ITERS)
    log = fake_slurm.read_log(slurm_log)
    assert len([r for r in log if "requeue" in r]) == 1, "a finished job must not be requeued"
    assert "training complete" in (run_dir / "events.log").read_text()
    print(f"attempt 0 (preempted at step {stop}): {t1 - t0:.1f}s, attempt 1: {t2 - t1:.1f}s")


def test_large_script_two_phases_with_srun_launcher(tmp_path, data_dir):
    """Phase 2 (longer sequences) starts from phase 1's final checkpoint and continues its step
    counter; a requeue of the finished job launches nothing. Here with LAUNCHER=srun: one srun task
    per rank, train.py maps the SLURM variables itself."""
    from sctd_dist.data.sample_cache import ensure_sample_dataset

    short = ensure_sample_dataset(Path(data_dir).parent, seq_length=32)
    env = fake_slurm.base_env(tmp_path)
    env.update(FAKE_SLURM_JOB_ID="77", LAUNCHER="srun", MODEL="tiny", TRAIN_ITERS="8",
               PHASE2_ITERS="4", SEQ_LENGTH="32", DATA_PATH=str(short), PHASE2_SEQ_LENGTH=str(SEQ),
               PHASE2_DATA_PATH=str(data_dir), DS_CONFIG="ds_configs/cpu_tiny.json",
               GPUS_PER_NODE="1", SAVE_DIR=str(tmp_path / "ckpt"), LOG_DIR=str(tmp_path / "logs"),
               GLOBAL_BATCH_SIZE="4", MAX_MICRO_BATCH="1",
               EVAL_ITERS="0", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    proc = submit(env, "slurm/pretrain_large.sh", "--nodes=2")
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-8000:]
    run_dir = tmp_path / "logs" / "sctd-bert-large-77"
    save = tmp_path / "ckpt"

    p1 = records(run_dir / "phase1" / "metrics.jsonl")
    assert events(p1, "start") and events(p1, "summary")[-1]["steps"] == 4
    assert checkpoint.latest_tag(save / "phase1") == "global_step4"
    p2 = records(run_dir / "phase2" / "metrics.jsonl")
    resume = events(p2, "resume")
    assert len(resume) == 1 and resume[0]["step"] == 4 and resume[0]["checkpoint"] == "global_step4"
    assert steps(p2) == [4, 5, 6, 7]
    # Other data and sequence length: phase 2's data starts at its first sample, and says so.
    (switch,) = events(p2, "data_switch")
    assert switch["changes"] == {"--data-path": [str(short.resolve()), str(Path(data_dir).resolve())],
                                 "--seq-length": [32, SEQ]}
    assert resume[0]["consumed_samples"] == switch["consumed_samples"] == 0
    assert [r["consumed_samples"] for r in p2 if r.get("step") == 4 and "loss" in r] == [4]
    # One LR schedule over all 8 steps (--lr-decay-iters): it peaks in phase 1, then one linear
    # decay in (8 - step) that phase 2 continues where phase 1 left it.
    lr = {r["step"]: r["lr"] for r in p1 + p2 if "lr" in r and "event" not in r}
    peak = max(lr, key=lr.get)
    assert sorted(lr) == list(range(8)) and peak < 4 and lr[peak] > 0
    assert all(lr[s] == pytest.approx(lr[peak] * (8 - s) / (8 - peak)) for s in range(peak, 8))
    assert events(p2, "summary")[-1]["steps"] == 8
    assert checkpoint.latest_tag(save / "phase2") == "global_step8"
    command = (run_dir / "phase2" / "command.sh").read_text()
    assert f"--load {save / 'phase1'}" in command and f"--seq-length {SEQ}" in command
    # Same global batch, different split: phase 1 capped at micro-batch 1 (2 accumulation steps),
    # phase 2 at the default cap (one step of 2 per rank).
    assert "--global-batch-size 4 --micro-batch-size 2" in command
    assert "--global-batch-size 4 --micro-batch-size 1" in (run_dir / "phase1" / "command.sh").read_text()
    log = fake_slurm.read_log(tmp_path / "slurm.log")
    sruns = [r for r in log if r["tool"] == "srun" and "argv" in r]
    assert len(sruns) == 2 and all("--ntasks-per-node=1" in r["argv"] for r in sruns)
    assert all(r["exit_codes"] == [0, 0] for r in log if "exit_codes" in r)

    # A requeue (or a second submission) of the finished job skips both phases.
    proc = submit(dict(env, SLURM_RESTART_COUNT="1"), "slurm/pretrain_large.sh", "--nodes=2")
    out = finish(proc, 60)
    assert proc.returncode == 0, out[-8000:]
    assert len([r for r in fake_slurm.read_log(tmp_path / "slurm.log") if "argv" in r and r["tool"] == "srun"]) == 2
    assert "phase2: already complete" in out and "training complete" in out
    print(f"two phases: {time.monotonic() - t0:.1f}s")


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_dry_run_container_commands(tmp_path, runtime):
    """DRY_RUN=1 prints each phase's srun command: containers get the checkout, logs and
    checkpoints mounted at the same paths; phase 2 loads phase 1's folder."""
    env = fake_slurm.base_env(tmp_path)
    env.pop("PYTHON")
    data = tmp_path / "data-s128"
    data.mkdir()
    image = "/images/sctd-dist.sqsh" if runtime == "pyxis" else "/images/sctd-dist.sif"
    env.update(FAKE_SLURM_JOB_ID="9", DRY_RUN="1", SAVE_DIR=str(tmp_path / "ckpt"),
               LOG_DIR=str(tmp_path / "logs"), DATA_PATH=str(data), NODES="2", GPUS_PER_NODE="4",
               **({"CONTAINER_IMAGE": image} if runtime == "pyxis" else {"APPTAINER_IMAGE": image}))
    proc = submit(env, "slurm/pretrain_large.sh", "--nodes=2")
    out = finish(proc, 60)
    assert proc.returncode == 0, out
    commands = [shlex.split(line.split("would run: ", 1)[1]) for line in out.splitlines() if "would run: " in line]
    assert len(commands) == 2, out
    mounts = {f"{p}:{p}" for p in (REPO, tmp_path / "logs", tmp_path / "ckpt", data)}
    for words in commands:
        assert words[0] == "srun"
        if runtime == "pyxis":
            assert f"--container-image={image}" in words
            flag = next(w for w in words if w.startswith("--container-mounts="))
            assert set(flag.split("=", 1)[1].split(",")) == mounts
        else:
            at = words.index("apptainer")
            assert words[at:at + 3] == ["apptainer", "exec", "--nv"] and words[-1] != image
            assert set(words[words.index("--bind") + 1].split(",")) == mounts
        assert " python3 -m torch.distributed.run --nnodes=2 --nproc_per_node=4 " in " ".join(words)
    phase1, phase2 = (" ".join(words) for words in commands)
    assert "--seq-length 128" in phase1 and "--seq-length 512" in phase2
    assert f"--load {tmp_path / 'ckpt' / 'phase1'}" in phase2 and f"--load" not in phase1
    # 256 sequences over 8 ranks: 32 per rank, micro-batch capped at 32 (phase 1) and 16 (phase 2).
    assert "--global-batch-size 256 --micro-batch-size 32" in phase1
    assert "--global-batch-size 256 --micro-batch-size 16" in phase2
    assert not [r for r in fake_slurm.read_log(tmp_path / "slurm.log") if r["tool"] == "srun"]
