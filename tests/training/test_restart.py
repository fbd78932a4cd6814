"""Exact restart from ZeRO checkpoints, kills at any moment, preemption and resharding.

Every job here is the real entry point under torchrun with 2 CPU ranks (gloo), the tiny model
and ScTD token dropping, in fp32 so restarted losses must equal uninterrupted ones exactly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import signal

import pytest

from sctd_dist import checkpoint
from tests.training import launch
from tests.conftest import SEQ

STEPS = 12
LAYOUTS = {"tp1dp2": ["--tensor-model-parallel-size", "1"],
           "tp2dp1": ["--tensor-model-parallel-size", "2", "--sequence-parallel"]}
STAGES = {1: "zero1_bf16.json", 2: "zero2_bf16.json", 3: "zero3_bf16.json"}


def job_args(tmp, data_dir, stage: int, layout: str, name: str, *extra: str) -> list[str]:
    config = launch.fp32_config(STAGES[stage], tmp / f"zero{stage}_fp32.json")
    return ["--deepspeed_config", str(config), "--data-path", str(data_dir), "--seq-length", str(SEQ),
            "--token-drop", "sctd", "--sctd-interval", "4", "--train-iters", str(STEPS),
            "--global-batch-size", "8", "--micro-batch-size", "2", "--eval-interval", str(STEPS),
            "--eval-iters", "2", "--save", str(tmp / name / "ckpt"), "--log-dir", str(tmp / name / "logs"),
            "--no-progress", *LAYOUTS[layout], *extra]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, data_dir):
    """Uninterrupted 12-step runs (checkpoints at 6 and 12), built on first use per case."""
    cache: dict = {}

    def get(stage: int, layout: str):
        if (stage, layout) not in cache:
            tmp = tmp_path_factory.mktemp(f"z{stage}{layout}")
            launch.train(2, *job_args(tmp, data_dir, stage, layout, "straight", "--save-interval", "6"))
            cache[(stage, layout)] = tmp
        return cache[(stage, layout)]

    return get


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_restart_from_step_6_equals_uninterrupted(straight_runs, data_dir, stage, layout):
    tmp = straight_runs(stage, layout)
    ref = launch.losses(tmp / "straight" / "logs")
    assert sorted(ref) == list(range(STEPS))
    # The job as it stood after its step-6 checkpoint: a copy with `latest` rolled back.
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "straight" / "ckpt" / "global_step6", resumed / "ckpt" / "global_step6")
    (resumed / "ckpt" / checkpoint.LATEST).write_text("global_step6")
    launch.train(2, *job_args(tmp, data_dir, stage, layout, "resumed", "--save-interval", "6"))
    got = launch.losses(resumed / "logs")
    assert sorted(got) == list(range(6, STEPS))  # resumed at 6, not from the start
    assert all(got[s] == ref[s] for s in got), {s: (got[s], ref[s]) for s in got}
    assert launch.events(resumed / "logs", "resume")[0]["consumed_samples"] == 6 * 8


def test_sigkill_then_restart_continues_exactly(straight_runs, data_dir, tmp_path):
    ref = launch.losses(straight_runs(2, "tp1dp2") / "straight" / "logs")
    args = job_args(tmp_path, data_dir, 2, "tp1dp2", "killed", "--save-interval", "6")
    launch.kill_after_checkpoint(2, tmp_path / "killed" / "ckpt", "global_step6", *args)
    launch.train(2, *args)
    got = launch.losses(tmp_path / "killed" / "logs")
    assert sorted(got) == list(range(STEPS))
    assert got == ref


def test_kill_during_save_keeps_the_previous_checkpoint(data_dir, tmp_path):
    args = job_args(tmp_path, data_dir, 2, "tp1dp2", "job", "--save-interval", "2")
    proc = launch.start(2, *args)
    ckpt = tmp_path / "job" / "ckpt"
    latest = ckpt / checkpoint.LATEST
    # Kill as soon as the step-4 folder appears: its files are being written, `latest` says 2.
    launch.wait_for(lambda: (ckpt / "global_step4").is_dir(), proc)
    launch.kill(proc, signal.SIGKILL)
    proc.wait()
    assert latest.read_text() in ("global_step2", "global_step4")
    if latest.read_text() == "global_step4":  # the kill came after the save completed
        assert (ckpt / "global_step4" / checkpoint.RUN_FILE).is_file()
    launch.train(2, *args)
    resumes = launch.events(tmp_path / "job" / "logs", "resume")
    assert resumes and resumes[0]["step"] in (2, 4)
    assert sorted(launch.losses(tmp_path / "job" / "logs")) == list(range(STEPS))


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(data_dir, tmp_path):
    args = job_args(tmp_path, data_dir, 1, "tp1dp2", "job", "--train-iters", "400")
    proc = launch.start(2, *args)
    log = tmp_path / "job" / "logs" / "metrics.jsonl"
    launch.wait_for(lambda: log.is_file() and log.read_text().count('"loss"') >= 3, proc)
    launch.signal_workers(proc, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    pre = launch.events(tmp_path / "job" / "logs", "preempted")
    assert pre and pre[0]["saved"]
    step = pre[0]["step"]
    assert (tmp_path / "job" / "ckpt" / checkpoint.LATEST).read_text() == checkpoint.tag_for(step)
    assert step < 400


def test_resume_on_a_different_data_parallel_size(data_dir, tmp_path):
    """Saved at DP=2, resumed at DP=1 (ZeRO-2): converted for the new layout, which the run logs.

    Dropout is off here: the new layout has fresh RNG streams, and without dropout the only
    difference left is the order of the gradient reduction, so the resumed losses must follow
    the uninterrupted ones closely (they would not if weights or Adam moments were lost)."""
    no_dropout = tmp_path / "model.json"
    no_dropout.write_text('{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}')
    extra = ("--model-config", str(no_dropout), "--save-interval", "6")
    launch.train(2, *job_args(tmp_path, data_dir, 2, "tp1dp2", "two", *extra))
    ref = launch.losses(tmp_path / "two" / "logs")
    shutil.copytree(tmp_path / "two" / "ckpt" / "global_step6", tmp_path / "one" / "ckpt" / "global_step6")
    (tmp_path / "one" / "ckpt" / checkpoint.LATEST).write_text("global_step6")
    proc = launch.train(1, *job_args(tmp_path, data_dir, 2, "tp1dp2", "one", *extra))
    assert "resuming global_step6, saved at TP=1 x DP=2, at TP=1 x DP=1" in proc.stderr
    logs = tmp_path / "one" / "logs"
    got = launch.losses(logs)
    resume = launch.events(logs, "resume")[0]
    assert resume["consumed_samples"] == 48 and resume["dp_size"] == 1
    (moved,) = launch.events(logs, "layout_change")
    assert (moved["saved_dp_size"], moved["dp_size"], moved["saved_tp_size"], moved["tp_size"]) == (2, 1, 1, 1)
    assert "RNG" in moved["not_preserved"]
    assert not launch.events(logs, "data_switch")
    assert sorted(got) == list(range(6, STEPS))
    for s in got:
        assert abs(got[s] - ref[s]) < 1e-4 * abs(ref[s]), (s, got[s], ref[s])


# --- Checkpoints that defend themselves: the ZeRO-2 run above, copied and damaged per case. ---

def _copy_checkpoints(straight_runs, dest):
    src = straight_runs(2, "tp1dp2") / "straight" / "ckpt"
    return shutil.copytree(src, dest / "ckpt", ignore=shutil.ignore_patterns("resharded"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": ("*zero_pp_rank_1_mp_rank_00_optim_states.pt", _truncate),
    "garbled model states": ("mp_rank_00_model_states.pt", _garble),
    "missing rng file": ("rng_rank1.pt", lambda p: p.unlink()),
    "garbled run record": (checkpoint.RUN_FILE, lambda p: p.write_text('{"step": 12, "mod')),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(straight_runs, tmp_path, case):
    ckpt = _copy_checkpoints(straight_runs, tmp_path)
    name, damage = DAMAGE[case]
    matches = sorted((ckpt / "global_step12").glob(name))
    assert matches, sorted(p.name for p in (ckpt / "global_step12").iterdir())
    damage(matches[0])
    tag, record, warnings = checkpoint.choose_checkpoint(ckpt)
    assert tag == "global_step6" and record.step == 6
    assert len(warnings) == 1 and str(matches[0]) in warnings[0] and "skipping global_step12" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.choose_checkpoint(ckpt, on_bad="stop")
    assert str(matches[0]) in str(err.value) and "--on-bad-checkpoint fallback" in str(err.value)
    assert "\n" not in str(err.value)


def test_no_checkpoint_that_verifies_is_refused_not_restarted(straight_runs, tmp_path):
    ckpt = _copy_checkpoints(straight_runs, tmp_path)
    for step in (6, 12):
        _truncate(ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* verifies"):
        checkpoint.choose_checkpoint(ckpt)


def test_restart_without_latest_over_a_truncated_checkpoint(straight_runs, data_dir, tmp_path):
    """`latest` deleted and the newest checkpoint truncated: the job resumes from step 6 (not 0),
    says why, and trains on exactly as the uninterrupted run did, replacing the bad step-12."""
    tmp = straight_runs(2, "tp1dp2")
    ref = launch.losses(tmp / "straight" / "logs")
    ckpt = _copy_checkpoints(straight_runs, tmp_path / "job")
    (ckpt / checkpoint.LATEST).unlink()
    (shard,) = (ckpt / "global_step12").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _truncate(shard)
    good = (ckpt / "global_step6" / "mp_rank_00_model_states.pt").read_bytes()
    proc = launch.train(2, *job_args(tmp_path, data_dir, 2, "tp1dp2", "job", "--save-interval", "6"))
    assert "resuming from the newest complete checkpoint, global_step12" in proc.stderr
    assert f"{shard} is truncated" in proc.stderr
    warnings = [e["message"] for e in launch.events(tmp_path / "job" / "logs", "checkpoint_warning")]
    assert len(warnings) == 2 and "skipping global_step12" in warnings[1]
    got = launch.losses(tmp_path / "job" / "logs")
    assert sorted(got) == list(range(6, STEPS)) and all(got[s] == ref[s] for s in got)
    assert (ckpt / checkpoint.LATEST).read_text() == "global_step12"
    assert checkpoint.verify(ckpt, "global_step12").step == 12  # replaced by a whole one
    assert (ckpt / "global_step6" / "mp_rank_00_model_states.pt").read_bytes() == good


def test_disk_full_during_a_save_keeps_the_last_checkpoint(data_dir, tmp_path):
    """A 48 MiB disk holds one 31 MiB checkpoint (step 2), not two: the step-4 save fails loudly,
    leaves no partial folder and `latest` on step 2; a rerun is refused before training."""
    from tests.mounts import tmpfs

    with tmpfs(tmp_path / "disk", "48m") as disk:
        args = ["--data-path", str(data_dir), "--seq-length", str(SEQ), "--train-iters", "4",
                "--global-batch-size", "2", "--micro-batch-size", "2", "--eval-iters", "0",
                "--save", str(disk / "ckpt"), "--save-interval", "2", "--no-progress",
                "--deepspeed_config", str(launch.fp32_config("zero2_bf16.json", tmp_path / "z2.json"))]
        proc = subprocess.run([sys.executable, "-m", "sctd_dist.train", *args], cwd=launch.REPO,
                              env=launch.env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert f"saving {disk / 'ckpt' / 'global_step4'} failed (" in proc.stderr
        assert f"{disk / 'ckpt' / 'latest'} still names global_step2" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in (disk / "ckpt").iterdir() if p.is_dir()) == ["global_step2"]
        assert checkpoint.verify(disk / "ckpt", "global_step2").step == 2
        again = subprocess.run([sys.executable, "-m", "sctd_dist.train", *args], cwd=launch.REPO,
                               env=launch.env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and "MiB free, but a checkpoint of this run takes about" in again.stderr
        assert (disk / "ckpt" / "latest").read_text() == "global_step2"
