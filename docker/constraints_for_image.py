"""Print constraints.txt without the packages this Python already has.

The GPU image extends NGC's Python, whose own builds (torch, numpy, ...) are pinned by NGC's pip
constraints and must stay; every other package installs at the tested version of constraints.txt.
Usage: python docker/constraints_for_image.py constraints.txt > /tmp/constraints.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def normalized(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main(path: str) -> None:
    present = {normalized(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    for line in open(path, encoding="utf-8"):
        name = line.split("==", 1)[0].strip()
        if line.startswith("#") or not name or normalized(name) not in present:
            sys.stdout.write(line)


if __name__ == "__main__":
    main(sys.argv[1])
