"""Weighted blends of prepared folders: which source, and which of its rows, each sample is.

`--data-path 0.7 DIR_A 0.3 DIR_B` (Megatron's form; weights are normalised) blends several
prepared folders into one global sample stream; one bare folder keeps the single-folder stream
of `sampler.py` unchanged.

Which source sample i of a blend comes from is a pure function of (seed, i), evaluated in O(1):
the stream is cut into blocks of `BLOCK` samples; every block holds exactly c_s samples of
source s (c = the largest-remainder apportionment of BLOCK * w, so each source's share is
within 1/BLOCK of its weight), interleaved in one fixed low-discrepancy order: source s's k-th
sample of a block sits at the rank of (k + phase_s) / c_s among every source's such keys,
phase_s in [0, 1) drawn from the seed. Any n consecutive samples hold n * w_s +- 2 of source s,
so short windows (a few global batches) already follow the weights. Because the order is the
same in every block, the number of samples source s received before sample i is closed-form,
which gives each sample's position *in its source* without a scan: exact restart, another DP
size and another TP layout keep working, as for one folder.

A source's own positions run through epochs of a keyed permutation of its rows (each source
shuffled with a seed of its own); a source that runs out starts a new epoch of itself, which the
loader reports as a `data_epoch` event.

A blend remembers where it began (`start`, a global position) and each source's position there
(`offsets`): a resume with another mixture continues every folder that was already in the
blend at its own position, and starts new folders at their first sample (see `carry_over`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .rng import DOMAIN_MIXTURE, derive_key, hash_uniform
from .sampler import SampleStream

BLOCK = 1 << 16  # samples per interleaving block: shares within 1/65536 of the weights


@dataclass(frozen=True)
class DataSource:
    """One prepared folder of a blend: its weight (normalised) and its path as given."""

    weight: float
    path: str  # as on the command line: the key of `consumed_samples_by_source`

    @property
    def folder(self) -> str:
        """The resolved folder (how resumes compare sources)."""
        return str(Path(self.path).expanduser().resolve())


def _weight(text: str, position: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--data-path: {text!r} (value {position}) should be a weight; write "
                         "`--data-path DIR` or `--data-path W1 DIR1 W2 DIR2 ...`") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--data-path: weight {text} of value {position} must be a number > 0")
    return value


def parse_data_path(values: Sequence[str | Path]) -> tuple[DataSource, ...]:
    """`--data-path` values -> sources with normalised weights.

    One value is one folder (weight 1); otherwise the values alternate weight, folder. Raises
    ValueError (one line naming --data-path) for an odd count, a weight that is not a positive
    number, or a folder named twice."""
    items = [str(v) for v in values]
    if not items:
        raise ValueError("--data-path needs a folder, or weight-folder pairs")
    if len(items) == 1:
        return (DataSource(1.0, items[0]),)
    if len(items) % 2:
        raise ValueError(f"--data-path got {len(items)} values; give one folder, or pairs of weight "
                         "and folder (`--data-path 0.7 DIR_A 0.3 DIR_B`)")
    weights = [_weight(items[i], i + 1) for i in range(0, len(items), 2)]
    paths = items[1::2]
    folders = [str(Path(p).expanduser().resolve()) for p in paths]
    twice = sorted({p for p, f in zip(paths, folders) if folders.count(f) > 1})
    if twice:
        raise ValueError(f"--data-path names {twice[0]} more than once; give each folder once with "
                         "its total weight")
    total = sum(weights)
    return tuple(DataSource(w / total, p) for w, p in zip(weights, paths))


def describe(sources: Sequence[DataSource]) -> list[list[Any]]:
    """The mixture as records carry it: [[weight, path as given], ...]."""
    return [[s.weight, s.path] for s in sources]


def check_sources(sources: Sequence[DataSource], seq_lengths: Sequence[int],
                  fingerprints: Sequence[str]) -> None:
    """Refuse (one line) a blend whose folders differ in sequence length or tokenizer."""
    first = sources[0].path
    for source, seq, fp in zip(sources[1:], seq_lengths[1:], fingerprints[1:]):
        if seq != seq_lengths[0]:
            raise ValueError(f"--data-path: {source.path} holds sequences of {seq} tokens, {first} of "
                             f"{seq_lengths[0]}; blend folders prepared at one --seq-length")
        if fp != fingerprints[0]:
            raise ValueError(f"--data-path: {source.path} was prepared with another tokenizer (fingerprint "
                             f"{fp}) than {first} ({fingerprints[0]}); blend folders prepared with one "
                             "tokenizer (prepare --tokenizer DIR)")


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder; ties to
    the earlier source). ValueError when a weight is too small to get one sample per block."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    if (counts == 0).any():
        raise ValueError(f"--data-path: a weight of {w[counts == 0][0] / w.sum():.2g} is below one sample "
                         f"in {total}; raise it or leave that folder out")
    return counts


class BlendOrder:
    """Which source each offset of a block holds, and its rank among that source's samples."""

    def __init__(self, weights: Sequence[float], seed: int, block: int = BLOCK):
        self.block = block
        self.counts = apportion(weights, block)
        phases = hash_uniform(derive_key(DOMAIN_MIXTURE, seed)[0], np.arange(len(self.counts)))
        source = np.repeat(np.arange(len(self.counts)), self.counts)
        rank = np.concatenate([np.arange(c) for c in self.counts])
        keys = (rank + phases[source]) / self.counts[source]
        order = np.lexsort((source, keys))  # by key, ties to the lower source index
        self.source_at = source[order]
        self.rank_at = rank[order]
        # offsets of each source within a block, ascending: counts before an offset by search
        self._offsets_of = [np.flatnonzero(self.source_at == s) for s in range(len(self.counts))]

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, number of that source's samples before it) of each blend index >= 0."""
        blocks, offsets = np.divmod(np.asarray(index, dtype=np.int64), self.block)
        source = self.source_at[offsets]
        return source, blocks * self.counts[source] + self.rank_at[offsets]

    def counts_before(self, n: int) -> np.ndarray:
        """Samples of each source among blend indices [0, n)."""
        blocks, offset = divmod(int(n), self.block)
        within = np.array([np.searchsorted(o, offset) for o in self._offsets_of], dtype=np.int64)
        return blocks * self.counts + within


class Blend:
    """Global stream positions -> (source, row, epoch) over one or more prepared folders.

    One source: today's single-folder stream (`SampleStream`, epochs of whole global batches, the
    position being the global one). Several: `BlendOrder` picks the source, and each source
    runs its own stream of full epochs (`SampleStream` over its rows, a seed of its own).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, global_batch_size: int):
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.start = 0  # the global position where this blend began
        self.offsets = np.zeros(len(self.sizes), dtype=np.int64)  # each source's position there
        if len(self.sizes) == 1:
            self.streams = [SampleStream(self.sizes[0], global_batch_size, seed)]
            self.seeds = [self.seed]
        else:
            self.seeds = [int(k >> np.uint64(1)) for k in derive_key(DOMAIN_MIXTURE, seed, count=len(sizes))]
            self.streams = [SampleStream(n, 1, s) for n, s in zip(self.sizes, self.seeds)]  # whole epochs

    @property
    def blended(self) -> bool:
        return len(self.sizes) > 1

    @cached_property
    def order(self) -> BlendOrder:
        return BlendOrder(self.weights, self.seed)

    def source_positions(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's stream) of global positions >= `start`."""
        pos = np.asarray(positions, dtype=np.int64)
        if not self.blended:
            return np.zeros_like(pos), pos
        if pos.size and pos.min() < self.start:
            raise ValueError(f"stream positions must be >= {self.start}, where this mixture began")
        source, before = self.order.locate(pos - self.start)
        return source, self.offsets[source] + before

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, dataset row, source epoch) of every global position (any shape)."""
        source, within = self.source_positions(positions)
        rows, epochs = np.empty_like(within), np.empty_like(within)
        for s in np.unique(source):
            sel = source == s
            rows[sel], epochs[sel] = self.streams[s].rows(within[sel])
        return source, rows, epochs

    def consumed(self, consumed_samples: int) -> np.ndarray:
        """Each source's position once `consumed_samples` global samples are consumed."""
        if not self.blended:
            return np.array([consumed_samples], dtype=np.int64)
        return self.offsets + self.order.counts_before(max(0, consumed_samples - self.start))

    def epochs(self, consumed_samples: int) -> list[int]:
        """The epoch each source's next sample belongs to."""
        return [st.epoch_of(int(c)) for st, c in zip(self.streams, self.consumed(consumed_samples))]

    def carry_over(self, start: int, positions: Sequence[int]) -> None:
        """Begin this blend at global position `start`, each source at its position `positions[s]`."""
        self.start = int(start)
        self.offsets = np.asarray(positions, dtype=np.int64)
        if not self.blended and self.offsets[0] != self.start:
            raise ValueError("a single folder's position is the global one")
