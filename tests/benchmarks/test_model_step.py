"""The model-step benchmark run as a user runs it (smallest size): every arm, including the
compiled ones, is timed, agrees with transformers, and gets its GEMM share and floors; the
results page renders them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402


def test_quick_run_with_compiled_arms_and_gemm_floors(tmp_path: Path) -> None:
    out = tmp_path / "model_step.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "model_step.py"), "--quick", "--threads", "1",
         "--models", "tiny", "--seqs", "128", "--dtypes", "fp32", "--vocab", "2000", "--repeats", "1",
         "--compile", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (case,) = json.loads(out.read_text())["cases"]
    arms = {"ours", "ours_allpos", "ours_compiled", "ours_allpos_compiled"}
    assert set(case["ratios_over_hf"]) == arms
    assert all(v > 0 for v in case["ratios_over_hf"].values())
    assert case["correctness_eval_mode"]["grad_rel_diff"] < 1e-5
    share = case["gemm_share"]
    assert set(share) == arms | {"hf"} and all(0.0 < v < 1.0 for v in share.values())
    assert case["equal_work_floor"] == share["hf"]
    for arm, eff in case["gemm_only_efficiency"].items():
        assert eff > case["cpu_efficiency"][arm]  # free non-GEMM work can only raise it
    page = report.model_step(json.loads(out.read_text()))
    assert "ours_compiled/HF" in page and "equal-work floor" in page
