"""constraints.txt (the tested versions, `make lock`) fits pyproject.toml's ranges and names one
exact version of every dependency; the Makefile and the images install torch at its version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and not re.search(r"[<>~!@ ]", version), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no tested version in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]} outside pyproject's {req.specifier}"
    assert "+" not in pins["torch"]  # a local label (+cpu) would refuse the CUDA build of the version


def test_installs_read_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(CONSTRAINTS)" in makefile and "sed -n 's/^torch==//p' $(CONSTRAINTS)" in makefile
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        assert "constraints.txt" in (REPO / "docker" / dockerfile).read_text()
