"""benchmarks/gpu.sh, run the way a user runs it, in its CPU smoke mode (tiny model, fp32).

The numbers are meaningless on a CPU; what is checked is that the script drives the real
training entry point for every arm, records what it promises in gpu.json, prints the table,
and keeps going (then exits non-zero) when an arm fails. Shellcheck/`bash -n` of gpu.sh is
covered by tests/launchers/test_lint.py, which lints every *.sh in the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sctd_dist.flops import step_flops_per_sequence
from sctd_dist.model.config import BertModelConfig, TokenDropConfig
from sctd_dist.model.router import num_kept
from tests.conftest import SEQ
from tests.training.launch import REPO, env

SCRIPT = REPO / "benchmarks" / "gpu.sh"


def _run(tmp_path: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # The session's prepared sample dataset (seq SEQ) lives in data_dir.parent: no rebuild.
    return subprocess.run(
        ["bash", str(SCRIPT), "--device-kind", "cpu", "--model", "tiny", "--seqs", str(SEQ),
         "--tp", "1", "--out", str(tmp_path / "gpu.json"), "--work-dir", str(tmp_path / "work"),
         "--data-cache", str(data_dir.parent), *args],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def test_cpu_smoke_run_records_every_arm(data_dir: Path, tmp_path: Path) -> None:
    proc = _run(tmp_path, data_dir, "--modes", "none,vanilla", "--train-iters", "4", "--warmup", "1",
                "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert not (tmp_path / "gpu.json").exists()  # --out-dir decides where the results go

    assert result["complete"] is True and result["failed_arms"] == []
    assert result["device_kind"] == "cpu" and result["device"]
    assert result["environment"]["device"] == result["device"]
    assert "--device-kind cpu" in result["command"]
    assert result["peak_tflops"] is None  # no known peak on a CPU, so no MFU
    settings = result["settings"]
    assert settings["precision"] == "fp32" and settings["ds_config"] == "ds_configs/cpu_tiny.json"
    assert settings["train_iters"] == 4 and settings["timed_steps"] == 3

    assert settings["compile_modes"] == ["eager"] and settings["budget_s"] is None  # CPU defaults
    arms = {a["mode"]: a for a in result["arms"]}
    assert list(arms) == ["none", "vanilla"]
    for mode, arm in arms.items():
        assert arm["status"] == "ok", arm.get("error")
        # What the run itself said at start-up: the attention kernel and the allocator it got.
        assert arm["compile"] is False and "--compile" not in arm["train_args"]
        assert arm["sdpa_backend"] in {"flash_attention", "efficient_attention", "math"}
        assert arm["allocator"]
        assert arm["seq_length"] == SEQ and arm["tp"] == 1 and arm["nproc"] == 1
        assert arm["sequence_parallel"] is False
        # The real entry point ran this arm: its own metrics.jsonl holds every step.
        assert ["--token-drop", mode] == arm["train_args"][arm["train_args"].index("--token-drop"):][:2]
        assert len(arm["step_time_s_per_step"]) == 4 and arm["steps_timed"] == 3
        log = Path(arm["log_dir"]) / "metrics.jsonl"
        assert sum('"tokens_per_s"' in line for line in log.read_text().splitlines()) == 4
        assert arm["tokens_per_s"] > 0 and arm["tokens_per_s_per_gpu"] == arm["tokens_per_s"]
        assert arm["tflops_per_device"] > 0
        assert arm["mfu"] is None and arm["mfu_minus_baseline"] is None
        assert arm["peak_memory_bytes_rank0"] > 0

    none, vanilla = arms["none"], arms["vanilla"]
    assert none["theory_flop_ratio"] == 1.0 and none["measured_time_ratio"] == 1.0
    assert none["realised_saving"] is None
    # The theoretical ratio is the one sctd_dist.flops gives for this model and length.
    cfg = BertModelConfig.from_preset("tiny", {"vocab_size": settings["model_overrides"]["bert"]["vocab_size"]})
    expected = (step_flops_per_sequence(cfg, TokenDropConfig(mode="vanilla"), SEQ, 0.15 * SEQ, 5,
                                        num_kept(SEQ, 0.5))
                / step_flops_per_sequence(cfg, TokenDropConfig(mode="none"), SEQ, 0.15 * SEQ, 5, None))
    assert abs(vanilla["theory_flop_ratio"] - expected) < 1e-12 and vanilla["theory_flop_ratio"] < 1.0
    assert abs(vanilla["measured_time_ratio"] - none["tokens_per_s"] / vanilla["tokens_per_s"]) < 1e-12
    realised = (1 - vanilla["measured_time_ratio"]) / (1 - vanilla["theory_flop_ratio"])
    assert abs(vanilla["realised_saving"] - realised) < 1e-12
    assert any(g["goal"].startswith("s64-tp1-vanilla: realises") for g in result["goals"])

    # The markdown table: printed and stored (and in gpu.md), one row per arm, MFU columns say
    # n/a on a CPU.
    table = result["table"]
    assert table in proc.stdout and table in (tmp_path / "out" / "gpu.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| arch | seq | TP |") and "MFU - baseline MFU" in lines[0]
    assert "theory FLOP ratio" in lines[0] and "realised saving" in lines[0]
    assert "| compile | attention kernel |" in lines[0]
    assert len(lines) == 2 + 2 and all("| n/a |" in row for row in lines[2:])


def test_a_compiled_arm_runs_train_py_with_compile(data_dir: Path, tmp_path: Path) -> None:
    proc = _run(tmp_path, data_dir, "--modes", "none", "--compile-modes", "compiled",
                "--train-iters", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (arm,) = json.loads((tmp_path / "gpu.json").read_text())["arms"]
    assert arm["name"] == f"s{SEQ}-tp1-none-compiled" and arm["status"] == "ok", arm.get("error")
    assert arm["compile"] is True and "--compile" in arm["train_args"]
    # train.py's own start record says its layers ran compiled.
    start = [json.loads(line) for line in (Path(arm["log_dir"]) / "metrics.jsonl").read_text().splitlines()
             if '"event": "start"' in line]
    assert start and start[0]["compile"] is True and start[0]["sdpa_backend"] == arm["sdpa_backend"]
    # fp32 on a CPU: no TF32; the share of micro-batches that attend with a mask is a share.
    assert start[0]["tf32"] is False and 0.0 <= start[0]["attention_mask_share"] <= 1.0


def test_arms_beyond_the_time_budget_are_skipped(data_dir: Path, tmp_path: Path) -> None:
    proc = _run(tmp_path, data_dir, "--modes", "none,vanilla", "--train-iters", "2", "--warmup", "1",
                "--budget-s", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["skipped_arms"] == ["s64-tp1-none", "s64-tp1-vanilla"] and result["failed_arms"] == []
    assert all(a["status"] == "skipped" and "budget" in a["error"] for a in result["arms"])
    assert "skipped for the time budget" in proc.stdout


def test_a_failed_arm_is_recorded_and_fails_the_run(data_dir: Path, tmp_path: Path) -> None:
    # A vocabulary smaller than the data's tokenizer makes train.py itself exit with an error.
    proc = _run(tmp_path, data_dir, "--modes", "none", "--train-iters", "2", "--warmup", "1",
                "--vocab-size", "100")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed arms: s64-tp1-none" in proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["complete"] is True and result["failed_arms"] == ["s64-tp1-none"]
    (arm,) = result["arms"]
    assert arm["status"] == "failed" and "vocab_size 100" in arm["error"]
    assert "| failed |" in result["table"]


def test_sctd_needs_whole_intervals_timed(tmp_path: Path, data_dir: Path) -> None:
    proc = _run(tmp_path, data_dir, "--modes", "sctd", "--train-iters", "4", "--warmup", "1")
    assert proc.returncode == 2
    assert "whole ScTD intervals of 10" in proc.stderr
    # The exit trap still leaves a result file saying why nothing ran.
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["complete"] is False and result["arms"] == [] and result["exit_code"] == 2
    assert "whole ScTD intervals of 10" in result["error"] and result["failed_phase"] == "benchmark"


def test_gpus_torch_cannot_see_stop_in_one_line_with_a_result_file(tmp_path: Path) -> None:
    """A host whose driver lists a GPU while its torch is a CPU build (this machine's torch, as
    on a host where pip resolved a +cpu wheel): one line, the result file, and no CPU run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # the host's driver tool, as such a host answers
    smi.write_text("#!/bin/sh\ncase \"$1\" in -L) echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)';;"
                   " *) echo '570.86.15';; esac\n")
    smi.chmod(0o755)
    run_env = {**env(), "PATH": f"{bin_dir}:{env()['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--out-dir", str(tmp_path / "out")],
                          cwd=REPO, env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "lists 1 GPU(s) (driver 570.86.15)" in errors[0] and "sees none" in errors[0]
    assert f"torch {torch.__version__}" in errors[0]
    assert "arms on" not in proc.stdout  # the benchmark never started
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert result["complete"] is False and result["arms"] == [] and result["exit_code"] == 3
    assert result["error"] in errors[0] and result["failed_phase"] == "setup"


def test_arms_run_in_order_of_value() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_throughput

    args, _, _ = gpu_throughput.parse(["--device-kind", "cpu", "--compile-modes", "eager,compiled",
                                       "--tp", "1,2", "--seqs", "128,512", "--train-iters", "20"])
    names = [a["name"] for a in gpu_throughput.build_arms(args, "cpu", 0)]
    if args.compile_fallback is None:  # this host can compile: compiled arms come last
        assert names[-1].endswith("-compiled") and not any(n.endswith("-compiled") for n in names[:12])
    assert names[:8] == ["s512-tp1-none", "s128-tp1-none", "s512-tp1-vanilla", "s512-tp1-sctd",
                         "s128-tp1-vanilla", "s128-tp1-sctd", "s512-tp2-none", "s128-tp2-none"]

    # On a GPU both architectures run: ModernBERT's TP=1 eager arms after BERT's, before TP=2,
    # with its own vocabulary and train.py's --arch.
    args, _, _ = gpu_throughput.parse(["--device-kind", "cpu", "--archs", "bert,modernbert",
                                       "--compile-modes", "eager", "--tp", "1,2", "--seqs", "512"])
    arms = gpu_throughput.build_arms(args, "cpu", 0)
    assert [a["name"] for a in arms][:7] == [
        "s512-tp1-none", "s512-tp1-vanilla", "s512-tp1-sctd", "modernbert-s512-tp1-none",
        "modernbert-s512-tp1-vanilla", "modernbert-s512-tp1-sctd", "s512-tp2-none"]
    modern = arms[3]
    assert gpu_throughput.vocab_size(args, "modernbert") == 50368
    train_args = gpu_throughput.train_args_for(modern, args, Path("m.json"))
    assert train_args[train_args.index("--arch"):][:2] == ["--arch", "modernbert"]
    # The theory is the GeGLU block's: another ratio than BERT's at the same length.
    assert arms[4]["theory_flop_ratio"] != arms[1]["theory_flop_ratio"] < 1.0
