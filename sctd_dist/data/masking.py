"""Dynamic masked-LM masking, applied when a row is loaded.

The masks of a row are a pure function of (seed, epoch, global sample index): a numpy Generator
is seeded from exactly those numbers, so a restart, another data-parallel size or another rank
of the same tensor-parallel group sees the same masks, and each epoch sees new ones.

Per row: of the n non-special tokens, exactly k are selected for prediction, k = p*n rounded
stochastically (floor, plus one with probability frac(p*n)) so the rate is unbiased even for
short rows; each selected token then becomes [MASK] (80%), a random non-special token (10%) or
stays unchanged (10%), decided independently. With whole-word masking, whole words (a
WordPiece start token and its "##" continuations) are selected in random order until k tokens
are covered; the word crossing k is taken with the probability that keeps the expected count at
exactly k.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .rng import DOMAIN_MASKING

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingConfig:
    """How many tokens to predict and what to replace them with."""

    mlm_probability: float = 0.15
    mask_probability: float = 0.8
    random_probability: float = 0.1
    keep_probability: float = 0.1
    whole_word_masking: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        parts = {"mask_probability": self.mask_probability, "random_probability": self.random_probability,
                 "keep_probability": self.keep_probability}
        for name, value in parts.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if abs(sum(parts.values()) - 1.0) > 1e-6:
            raise ValueError("mask_probability + random_probability + keep_probability must sum to 1, got "
                             f"{' + '.join(f'{v:g}' for v in parts.values())} = {sum(parts.values()):g}")


@lru_cache(maxsize=16)
def _vocab_tables(specials: tuple[int, ...], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_special per id, the non-special ids): built once per vocabulary, read-only."""
    is_special = np.zeros(vocab_size, dtype=bool)
    is_special[[s for s in specials if 0 <= s < vocab_size]] = True
    non_special = np.flatnonzero(~is_special)
    if non_special.size == 0:
        raise ValueError("every id of the vocabulary is a special token")
    is_special.flags.writeable = False
    non_special.flags.writeable = False
    return is_special, non_special


def _generator(seed: int, epoch: int, sample_index: int) -> np.random.Generator:
    if min(seed, epoch, sample_index) < 0:
        raise ValueError(f"seed, epoch and sample_index must be >= 0, got {(seed, epoch, sample_index)}")
    return np.random.default_rng(np.random.SeedSequence([DOMAIN_MASKING, seed, epoch, sample_index]))


def _select_tokens(rng: np.random.Generator, candidates: np.ndarray, k: int) -> np.ndarray:
    """k distinct candidate positions, uniformly at random (bool mask over the row)."""
    priority = rng.random(candidates.size)
    priority[~candidates] = np.inf  # specials sort last and are never among the k
    chosen = np.zeros(candidates.size, dtype=bool)
    if k > 0:
        chosen[np.argpartition(priority, k - 1)[:k]] = True
    return chosen


def _select_words(rng: np.random.Generator, candidates: np.ndarray, word_starts: np.ndarray,
                  k: int) -> np.ndarray:
    """Whole words in random order until about k tokens are covered (expected count exactly k)."""
    # A new word starts at a word-start token, after a special token, or at the row's first token.
    starts = np.asarray(word_starts, dtype=bool) | ~candidates
    starts[0] = True
    word_of = np.cumsum(starts) - 1
    n_words = int(word_of[-1]) + 1
    sizes = np.bincount(word_of[candidates], minlength=n_words)
    priority = rng.random(n_words)
    crossing_draw = rng.random()
    order = np.argsort(np.where(sizes > 0, priority, np.inf), kind="stable")
    order = order[: int((sizes > 0).sum())]
    covered = np.cumsum(sizes[order])
    take = int(np.searchsorted(covered, k, side="right"))  # words fully inside the budget
    if take < order.size:
        before = int(covered[take - 1]) if take else 0
        if crossing_draw < (k - before) / sizes[order[take]]:
            take += 1
    chosen_words = np.zeros(n_words, dtype=bool)
    chosen_words[order[:take]] = True
    return chosen_words[word_of] & candidates


def mask_sequence(
    token_ids: np.ndarray,
    *,
    seed: int,
    epoch: int,
    sample_index: int,
    special_ids: tuple[int, ...] | list[int] | np.ndarray,
    mask_id: int,
    vocab_size: int,
    config: MaskingConfig = MaskingConfig(),
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one row; returns (input_ids, labels) as int64, labels -100 where nothing is predicted.

    `special_ids` are never selected and never drawn as random replacements. `word_starts`
    (bool per position, True where a word begins) is required for whole-word masking.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size})")
    is_special, non_special = _vocab_tables(tuple(sorted({int(s) for s in special_ids})), int(vocab_size))
    rng = _generator(seed, epoch, sample_index)
    candidates = ~is_special[ids]
    n = int(candidates.sum())
    target = config.mlm_probability * n
    k = int(target) + int(rng.random() < target - int(target))
    if config.whole_word_masking:
        if word_starts is None:
            raise ValueError("whole-word masking needs word_starts (bool per token)")
        selected = _select_words(rng, candidates, word_starts, k) if n else np.zeros(ids.size, bool)
    else:
        selected = _select_tokens(rng, candidates, k)
    action = rng.random(ids.size)

    labels = np.full(ids.size, IGNORE_INDEX, dtype=np.int64)
    labels[selected] = ids[selected]
    out = ids.copy()
    to_mask = selected & (action < config.mask_probability)
    to_random = selected & ~to_mask & (action < config.mask_probability + config.random_probability)
    out[to_mask] = mask_id
    out[to_random] = non_special[rng.integers(0, non_special.size, size=int(to_random.sum()))]
    return out, labels


def mask_rows(
    rows: np.ndarray,
    *,
    seed: int,
    epochs: np.ndarray,
    sample_indices: np.ndarray,
    special_ids: tuple[int, ...],
    mask_id: int,
    vocab_size: int,
    config: MaskingConfig = MaskingConfig(),
    word_start_table: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_sequence` applied to each row of a [B, S] array (same results, row by row).

    `word_start_table` maps token id -> starts-a-word (needed for whole-word masking).
    """
    rows = np.asarray(rows, dtype=np.int64)
    inputs = np.empty_like(rows)
    labels = np.empty_like(rows)
    for r in range(rows.shape[0]):
        starts = word_start_table[rows[r]] if word_start_table is not None else None
        inputs[r], labels[r] = mask_sequence(
            rows[r], seed=seed, epoch=int(epochs[r]), sample_index=int(sample_indices[r]),
            special_ids=special_ids, mask_id=mask_id, vocab_size=vocab_size, config=config,
            word_starts=starts)
    return inputs, labels


def masked_positions(labels: np.ndarray) -> np.ndarray:
    """Flat indices (row-major over a [B, S] batch) of the positions with a label: where the MLM
    head runs. Made on the host with the batch, so the step need not find them on the device."""
    return np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
