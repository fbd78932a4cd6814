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


# --- Every bad input of this table costs one line naming what to change, before any process
# group exists (so they run in this process; `latest` pointing elsewhere and damaged checkpoints
# are refused by the checkpointer: tests/test_checkpoint.py, tests/training/test_restart.py). ---

def _ds_config(tmp, edit):
    cfg = json.loads((REPO / "ds_configs" / "cpu_tiny.json").read_text())
    edit(cfg)
    path = tmp / "ds.json"
    path.write_text(json.dumps(cfg))  # json writes NaN and Infinity as such
    return ["--deepspeed_config", str(path)]


def _model_config(tmp, text):
    path = tmp / "model.json"
    path.write_text(text)
    return ["--model-config", str(path)]


def _set(section, key, value):
    return lambda cfg: cfg.setdefault(section, {}).setdefault("params", {}).__setitem__(key, value)


def _garbled_metadata(tmp, data_dir):
    import shutil

    copy = shutil.copytree(data_dir, tmp / "data")
    (copy / "metadata.json").write_text('{"format": "sctd-dist-packed", "version": 1, "seq_')
    return ["--data-path", str(copy)]


def _no_validation(tmp, data_dir):
    import shutil

    copy = shutil.copytree(data_dir, tmp / "data")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["splits"]["validation"]["shards"] = []  # as from a corpus of one long document
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


BAD_INPUTS = {
    "nan flag": (lambda t, d: ["--sctd-weight", "nan"], "--sctd-weight: 'nan' is not a finite number"),
    "inf lr": (lambda t, d: ["--lr", "inf"], "--lr: 'inf' is not a finite number"),
    "negative lr": (lambda t, d: ["--lr", "-1"], "--lr must be > 0"),
    "model str": (lambda t, d: _model_config(t, '{"hidden_size": "128"}'),
                  "--model-config field hidden_size must be an integer, got '128'"),
    "model float": (lambda t, d: _model_config(t, '{"num_hidden_layers": 4.5}'),
                    "--model-config field num_hidden_layers must be an integer, got 4.5"),
    "model null": (lambda t, d: _model_config(t, '{"intermediate_size": null}'),
                   "--model-config field intermediate_size must be an integer, got None"),
    "model nan": (lambda t, d: _model_config(t, '{"hidden_dropout_prob": NaN}'),
                  "--model-config field hidden_dropout_prob must be a finite number, got nan"),
    "model not json": (lambda t, d: _model_config(t, '{"hidden_size": '), "--model-config"),
    "lr string": (lambda t, d: _ds_config(t, _set("optimizer", "lr", "fast")),
                  "optimizer.params.lr must be a number > 0, got 'fast'"),
    "betas of one": (lambda t, d: _ds_config(t, _set("optimizer", "betas", [0.9])),
                     "optimizer.params.betas must be two numbers in [0, 1), got [0.9]"),
    "eps nan": (lambda t, d: _ds_config(t, _set("optimizer", "eps", float("nan"))),
                "optimizer.params.eps is not a finite number"),
    "negative clipping": (lambda t, d: _ds_config(t, lambda c: c.__setitem__("gradient_clipping", -5)),
                          "gradient_clipping must be a number >= 0, got -5"),
    "save is a file": (lambda t, d: ["--save", str(t / "file")], "is a file, not a folder"),
    "garbled metadata": (_garbled_metadata, "metadata.json is not valid JSON"),
    "no validation rows": (lambda t, d: ["--data-path", str(_no_validation(t, d))],
                           "is empty; prepare it with a larger --validation-fraction, or pass --eval-iters 0"),
}


@pytest.fixture
def restore_signals():
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_costs_one_line(case, tmp_path, data_dir, capsys, restore_signals):
    from sctd_dist.train import main

    (tmp_path / "file").write_text("x")
    make_args, needle = BAD_INPUTS[case]
    args = ["--data-path", str(data_dir), "--seq-length", "64", *make_args(tmp_path, data_dir)]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 0
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]


def test_read_only_save_is_refused_at_start(tmp_path, data_dir, capsys):
    from tests.mounts import tmpfs
    from sctd_dist.train import main

    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:  # found at start, not at parsing
        code = main(["--data-path", str(data_dir), "--seq-length", "64", "--save", str(ro / "ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and f"--save {ro / 'ckpt'} is not writable" in err and "Read-only" in err


def test_empty_validation_split_is_a_warning_without_evaluation(tmp_path, data_dir, capsys):
    from sctd_dist.arguments import parse_args
    from sctd_dist.run import open_data

    data = _no_validation(tmp_path, data_dir)
    _, train, valid = open_data(parse_args(["--data-path", str(data), "--seq-length", "64",
                                            "--eval-iters", "0"]))
    assert len(train) > 0 and len(valid) == 0
    assert f"warning: the validation split of {data} is empty" in capsys.readouterr().err
