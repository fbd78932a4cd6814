"""One prepared sample dataset (seq 64) shared by every training test and xdist worker."""

from __future__ import annotations

import pytest

SEQ = 64


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from sctd_dist.data.prepare import ensure_sample_dataset

    # The parent of the per-worker base temp is shared by all xdist workers; the builder locks.
    return ensure_sample_dataset(tmp_path_factory.getbasetemp().parent / "sctd-data", seq_length=SEQ)
