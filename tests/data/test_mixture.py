"""Weighted blends of prepared folders: parsing, the interleaving order, the loader over a blend
(shares, DP-size independence, exact resume, epochs of a source, a changed mixture)."""

from __future__ import annotations

import numpy as np
import pytest

from sctd_dist.data.dataset import PackedDataset
from sctd_dist.data.loader import PretrainingDataLoader
from sctd_dist.data.mixture import BlendOrder, DataSource, apportion, parse_data_path

G, MICRO, STEPS = 8, 2, 80  # 640 samples, 480 of the small folder: more than one epoch of it
WEIGHTS = (0.25, 0.75)


def test_parse_data_path_forms_and_one_line_errors(tmp_path) -> None:
    assert parse_data_path(["/d/a"]) == (DataSource(1.0, "/d/a"),)
    mix = parse_data_path(["3", "/d/a", "1", "/d/b"])
    assert [s.weight for s in mix] == [0.75, 0.25] and [s.path for s in mix] == ["/d/a", "/d/b"]
    bad = {("0.5", "/d/a", "0.5"): "3 values", ("x", "/d/a", "1", "/d/b"): "'x' (value 1) should be a weight",
           ("0", "/d/a", "1", "/d/b"): "weight 0 of value 1 must be a number > 0",
           ("nan", "/d/a", "1", "/d/b"): "must be a number > 0",
           ("1", str(tmp_path), "1", str(tmp_path / ".." / tmp_path.name)): "more than once"}
    for values, message in bad.items():
        with pytest.raises(ValueError, match="--data-path") as err:
            parse_data_path(list(values))
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="below one sample"):
        apportion([1.0, 1e-7], 1 << 16)


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.5, 0.3, 0.2), (0.9, 0.05, 0.05)])
def test_blend_order_follows_the_weights_in_every_window(weights) -> None:
    order = BlendOrder(weights, seed=3, block=4096)
    assert order.counts.sum() == 4096 and np.all(np.abs(order.counts / 4096 - weights) <= 1 / 4096)
    index = np.arange(3 * 4096 + 100)  # across block boundaries
    source, before = order.locate(index)
    for s, w in enumerate(weights):
        mine = source == s
        # the number of earlier samples of the source, counted directly
        assert np.array_equal(before[mine], np.arange(mine.sum()))
        for n in (8, 40, 333):  # any window of n consecutive samples holds n*w +- 2 of source s
            window = np.convolve(mine, np.ones(n, dtype=int), mode="valid")
            assert np.abs(window - n * w).max() <= 2.0, (s, n)
        assert all(order.counts_before(i)[s] == mine[:i].sum() for i in (0, 1, 4095, 4096, 4097, 9000))


def _loader(datasets, dp_rank=0, dp_size=1, weights=WEIGHTS, **kw) -> PretrainingDataLoader:
    return PretrainingDataLoader(datasets, global_batch_size=G, micro_batch_size=MICRO, dp_rank=dp_rank,
                                 dp_size=dp_size, seed=11, weights=list(weights),
                                 names=["A", "B"][:len(datasets)], **kw)


@pytest.fixture(scope="module")
def sources(data_dir, prepared):
    """A large and a small folder (the small one runs out within the test's steps)."""
    big, small = PackedDataset(data_dir), PackedDataset(prepared)
    assert len(small) < STEPS * G * WEIGHTS[1] < len(big)
    return [big, small]


def _step_samples(loaders, consumed):
    """(source, row, epoch) of every sample of the step, in stream order, over the DP ranks."""
    per_rank = [np.stack([ld.sources_for_step(consumed), *ld.sample_indices_for_step(consumed)])
                for ld in loaders]
    return np.concatenate([per_rank[r][:, j] for j in range(loaders[0].grad_accum)
                           for r in range(len(loaders))], axis=1)


def test_blend_shares_are_the_same_at_dp1_and_dp2_and_wrap_with_an_event(sources) -> None:
    one = _loader(sources)
    two = [_loader(sources, r, 2) for r in range(2)]
    events, seen = [], {0: [], 1: []}
    for step in range(STEPS):
        a, b = _step_samples([one], one.consumed_samples), _step_samples(two, one.consumed_samples)
        assert np.array_equal(a, b)
        for s in (0, 1):
            seen[s] += [(int(e), int(r)) for e, r in zip(a[2][a[0] == s], a[1][a[0] == s])]
        next(one)
        events += one.take_events()
    counts = one.consumed_samples_by_source
    assert counts == {"A": len(seen[0]), "B": len(seen[1])} and sum(counts.values()) == STEPS * G
    assert abs(counts["A"] / (STEPS * G) - WEIGHTS[0]) < 0.01
    small = len(sources[1])
    assert events == [{"source": "B", "epoch": 1, "consumed_samples": e["consumed_samples"]} for e in events]
    assert len(events) == counts["B"] // small >= 1
    # each epoch of the small folder is a permutation of its rows, then a new one begins
    first, second = [r for e, r in seen[1] if e == 0], [r for e, r in seen[1] if e == 1]
    assert sorted(first) == list(range(small)) and len(set(second)) == len(second)
    assert not one.blend.epochs(0)[1] and one.blend.epochs(one.consumed_samples)[1] == 1


def test_blend_resumes_exactly_and_batches_hold_each_source_rows(sources) -> None:
    ref = _loader(sources)
    for _ in range(17):
        next(ref)
    resumed = _loader(sources, 1, 2)
    resumed.load_state_dict(ref.state_dict())
    assert resumed.consumed_samples_by_source == ref.consumed_samples_by_source
    src, rows = resumed.sources_for_step(resumed.consumed_samples), resumed.sample_indices_for_step(
        resumed.consumed_samples)[0]
    batch = next(resumed)[0]
    for i in range(MICRO):
        original = sources[src[0, i]].get_rows(rows[0, i:i + 1])[0]
        real = batch["labels"][i] == -100
        assert np.array_equal(batch["input_ids"][i][real].numpy(), original[real.numpy()])


def test_a_changed_mixture_continues_each_folder_at_its_own_position(sources) -> None:
    old = _loader(sources)
    for _ in range(5):
        next(old)
    saved = old.state_dict()
    # a data switch that keeps no global position: the blend begins at 0, folders continue
    new = _loader(sources, weights=(0.5, 0.5))
    new.carry_source_positions(saved)
    assert new.consumed_samples == 0
    assert new.consumed_samples_by_source == old.consumed_samples_by_source
    next(new)
    assert sum(new.consumed_samples_by_source.values()) == sum(saved["source_positions"].values()) + G
    # one folder only before: it continues, the new folder starts at its first sample
    single = PretrainingDataLoader(sources[0], global_batch_size=G, micro_batch_size=MICRO, dp_rank=0,
                                   dp_size=1, seed=11)
    for _ in range(3):
        next(single)
    blend = _loader(sources, weights=(0.5, 0.5))
    blend.load_state_dict(single.state_dict())  # --keep-data-position
    assert blend.consumed_samples == 3 * G
    assert blend.consumed_samples_by_source == {"A": 3 * G, "B": 0}
