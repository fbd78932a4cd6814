"""In-process model tests run at TP=1 on a one-rank group (in-memory store, no port)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ctx1():
    from sctd_dist.parallel import initialize

    return initialize(1)
