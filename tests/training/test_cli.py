"""Bad input fails before any work, with a message that says what to change."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.training.launch import REPO, env


def run_train(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sctd_dist.train", *args], cwd=REPO,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=120)


def test_missing_deepspeed_config_names_the_presets(tmp_path):
    p = run_train("--deepspeed_config", str(tmp_path / "nope.json"))
    assert p.returncode == 2
    assert "--deepspeed_config" in p.stderr and "zero2_bf16.json" in p.stderr


def test_removed_deepspeed_key_is_named(tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "cpu_tiny.json").read_text())
    cfg["progressive_layer_drop"] = {"enabled": True}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(cfg))
    p = run_train("--deepspeed_config", str(path), "--data-path", str(tmp_path))
    assert p.returncode == 2
    assert "progressive_layer_drop" in p.stderr
    assert "Traceback" not in p.stderr


def test_tp_size_not_dividing_the_world(tmp_path):
    p = run_train("--tensor-model-parallel-size", "2",
                  extra_env={"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": "1"})
    assert p.returncode == 2
    assert "does not divide the world size 3" in p.stderr


def test_missing_data_dir(tmp_path):
    p = run_train("--data-path", str(tmp_path / "missing"))
    assert p.returncode == 2
    assert "--data-path" in p.stderr and "sctd_dist.data.prepare" in p.stderr


@pytest.mark.parametrize("flag,value,needle", [
    ("--token-keep-ratio", "1.5", "--token-keep-ratio must be in (0, 1]"),
    ("--token-keep-ratio", "0", "--token-keep-ratio must be in (0, 1]"),
    ("--sctd-interval", "0", "--sctd-interval must be >= 1"),
    ("--lr-decay-iters", "0", "--lr-decay-iters must be >= 1"),
    ("--sctd-mlm-mix", "1.5", "--sctd-mlm-mix must be in [0, 1]"),
    ("--sctd-mlm-mix", "nan", "--sctd-mlm-mix must be in [0, 1]"),
    ("--sctd-weight", "nan", "--sctd-weight must be a finite number >= 0"),
    ("--sctd-weight", "-1", "--sctd-weight must be a finite number >= 0"),
])
def test_out_of_range_flags(flag, value, needle):
    p = run_train(flag, value)
    assert p.returncode == 2 and needle in p.stderr


def test_heads_not_divisible_by_tp(tmp_path):
    p = run_train("--model", "base", "--tensor-model-parallel-size", "5",
                  extra_env={"RANK": "0", "WORLD_SIZE": "5", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": "1"})
    assert p.returncode == 2
    assert "num_attention_heads 12 is not divisible by --tensor-model-parallel-size 5" in p.stderr


@pytest.mark.parametrize("saved_change, needle", [
    ({"zero_stage": 3}, "saved with ZeRO stage 3 and this run uses stage 1"),  # and another layout
    ({"model": {"hidden_size": 64}}, "hidden_size: checkpoint 64, now 128"),
])
def test_checkpoint_that_cannot_resume_is_refused_before_any_work(tmp_path, data_dir, saved_change, needle):
    """A checkpoint saved at TP=2 x DP=1 resumes at TP=1 x DP=1 unless something else forbids
    it; then one line says what, before any process group or model is made."""
    from sctd_dist import checkpoint
    from sctd_dist.data.dataset import PackedDataset
    from sctd_dist.model.config import BertModelConfig

    model = BertModelConfig.from_preset("tiny", vocab_size=PackedDataset(data_dir).vocab_size).to_dict()
    assert model["hidden_size"] == 128
    record = {"step": 4, "model": model, "tensor_model_parallel_size": 2, "dp_size": 1, "world_size": 2,
              "zero_stage": 1}
    record.update({k: {**record[k], **v} if isinstance(v, dict) else v for k, v in saved_change.items()})
    folder = tmp_path / "ckpt" / checkpoint.tag_for(4)
    folder.mkdir(parents=True)
    (folder / checkpoint.RUN_FILE).write_text(json.dumps(record))
    (tmp_path / "ckpt" / checkpoint.LATEST).write_text(folder.name)
    p = run_train("--data-path", str(data_dir), "--seq-length", "64", "--load", str(tmp_path / "ckpt"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "ckpt" / "resharded").exists()  # nothing was converted
