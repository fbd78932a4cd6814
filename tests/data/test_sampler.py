"""The global sample stream: keyed permutations, epochs, the DP split."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sctd_dist.data.rng import FeistelPermutation
from sctd_dist.data.sampler import SampleStream, check_batch_sizes, step_positions


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 12_345])
def test_feistel_is_a_permutation(n: int) -> None:
    perm = FeistelPermutation(n, (1, 2))(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(perm[::-1][: n // 2], FeistelPermutation(n, (1, 2))(np.arange(n)[::-1][: n // 2]))


def test_feistel_shuffles_and_depends_on_key() -> None:
    n = 10_000
    a = FeistelPermutation(n, (1, 0))(np.arange(n))
    b = FeistelPermutation(n, (1, 1))(np.arange(n))
    assert (a != b).mean() > 0.99
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the original order
    assert (a[:100] < n // 2).mean() > 0.3 and (a[:100] < n // 2).mean() < 0.7
    # O(1): position 10^12 of a 10^13-element permutation without building anything
    t0 = time.perf_counter()
    x = FeistelPermutation(10**13, (5,))(np.array([10**12, 0, 10**13 - 1]))
    assert time.perf_counter() - t0 < 0.5 and (x >= 0).all() and (x < 10**13).all()


def test_each_epoch_is_a_fresh_permutation() -> None:
    stream = SampleStream(num_samples=103, global_batch_size=10, seed=3)
    per_epoch = 100  # the remainder of 3 rows is dropped, a different one each epoch
    assert stream.samples_per_epoch == per_epoch
    rows, epochs = stream.rows(np.arange(3 * per_epoch))
    for e in range(3):
        chunk = rows[e * per_epoch:(e + 1) * per_epoch]
        assert (epochs[e * per_epoch:(e + 1) * per_epoch] == e).all()
        assert len(set(chunk.tolist())) == per_epoch  # no row twice in an epoch
    assert not np.array_equal(rows[:per_epoch], rows[per_epoch:2 * per_epoch])
    assert stream.epoch_of(per_epoch - 1) == 0 and stream.epoch_of(per_epoch) == 1


def test_dp_split_covers_the_global_batch_once() -> None:
    g, m = 24, 3
    for dp in (1, 2, 4, 8):
        pos = np.concatenate([step_positions(48, global_batch_size=g, micro_batch_size=m, dp_rank=r, dp_size=dp)
                              .reshape(-1) for r in range(dp)])
        assert sorted(pos.tolist()) == list(range(48, 72))
    # Megatron layout: micro-step j of rank r is a contiguous slice
    p = step_positions(0, global_batch_size=g, micro_batch_size=m, dp_rank=1, dp_size=4)
    assert p.shape == (2, 3) and p[0].tolist() == [3, 4, 5] and p[1].tolist() == [15, 16, 17]


def test_batch_size_errors_say_what_to_change() -> None:
    assert check_batch_sizes(32, 4, 2) == 4
    with pytest.raises(ValueError, match=r"not divisible .* 4 x 3 = 12; use a global batch of 24 or 36"):
        check_batch_sizes(32, 4, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SampleStream(num_samples=5, global_batch_size=8, seed=0)
