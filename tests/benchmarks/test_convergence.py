"""The convergence study and the results page, run as a user runs them (tiny budget)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SEQ

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_equal_budget_study_and_results_page(data_dir: Path, tmp_path: Path) -> None:
    budget = 4.0
    _run("convergence.py", "--threads", "1", "--budget-s", str(budget), "--evals", "2", "--layers", "4",
         "--hidden", "32", "--batch", "4", "--seq-length", str(SEQ), "--eval-samples", "8",
         "--data-cache", str(data_dir.parent), "--validation-fraction", "0.01", "--no-progress",
         "--out", str(tmp_path / "convergence.json"), "--plots", str(tmp_path))
    result = json.loads((tmp_path / "convergence.json").read_text())
    arms = result["arms"]
    assert set(arms) == {"none", "vanilla", "sctd"}
    for mode, arm in arms.items():
        # Every arm trains until its own clock passes the budget, and no further than one step.
        last_step = arm["train_loss"][-1][0] - arm["train_loss"][-2][0]
        assert budget <= arm["train_s"] <= budget + last_step + 1e-6
        assert [e["step"] for e in arm["evals"]][0] == 0 and len(arm["evals"]) == 3
        assert arm["evals"][-1]["eval_loss"] < arm["evals"][0]["eval_loss"]  # it learns
        if mode == "none":
            assert "cls_cosine" not in arm["evals"][-1]
        else:
            assert all(-1.0 <= e["cls_cosine_centered"] <= 1.0 for e in arm["evals"])
    # The same initial weights: the step-0 evaluation is identical for every arm.
    assert len({arm["evals"][0]["eval_loss"] for arm in arms.values()}) == 1
    for png in ("convergence_loss.png", "convergence_drift.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _run("report.py", "--results", str(tmp_path))
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Quality at equal wall-clock" in page and "| ScTD |" in page
    assert "No `token_drop.json` yet." in page  # absent results are said, not invented
    assert "convergence_drift.png" in page
