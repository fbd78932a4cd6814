"""Dynamic masking: rates, special tokens, determinism, whole words."""

from __future__ import annotations

import numpy as np
import pytest

from sctd_dist.data.masking import IGNORE_INDEX, MaskingConfig, mask_rows, mask_sequence

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 5000
SEQ = 128


def _rows(n: int, seed: int = 0) -> np.ndarray:
    """Packed-like rows: [CLS] text [SEP] text [SEP] ... with some [UNK]s and a padded tail."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(5, VOCAB, size=(n, SEQ))
    rows[:, 0] = CLS
    rows[:, -1] = SEP
    rows[rng.random((n, SEQ)) < 0.03] = SEP
    rows[rng.random((n, SEQ)) < 0.01] = UNK
    rows[rng.random((n, SEQ)) < 0.03] = MASK  # ids of [MASK] in the input are never targets either
    tail = rng.integers(0, SEQ // 2, size=n)
    for r, t in enumerate(tail):
        if t:
            rows[r, SEQ - t:] = PAD
            rows[r, SEQ - t - 1] = SEP
    return rows


def _mask(rows, config=MaskingConfig(), seed=1, epoch=0, word_start_table=None):
    return mask_rows(rows, seed=seed, epochs=np.full(len(rows), epoch), sample_indices=np.arange(len(rows)),
                     special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB, config=config,
                     word_start_table=word_start_table)


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_rates_on_100k_tokens(rate) -> None:
    rows = _rows(1300)
    inputs, labels = _mask(rows, MaskingConfig(mlm_probability=rate))
    candidates = ~np.isin(rows, SPECIALS)
    assert candidates.sum() > 100_000
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum() / candidates.sum() - rate) < 0.01
    np.testing.assert_array_equal(labels[selected], rows[selected])
    became_mask = (inputs == MASK) & selected
    unchanged = (inputs == rows) & selected
    random = selected & ~became_mask & ~unchanged
    n = selected.sum()
    assert abs(became_mask.sum() / n - 0.8) < 0.01
    assert abs(random.sum() / n - 0.1) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01
    np.testing.assert_array_equal(inputs[~selected], rows[~selected])  # nothing else changes


def test_special_tokens_are_never_masked_nor_drawn() -> None:
    rows = _rows(300)
    inputs, labels = _mask(rows, MaskingConfig(mlm_probability=0.9, mask_probability=0.0,
                                               random_probability=1.0, keep_probability=0.0))
    special = np.isin(rows, SPECIALS)
    assert (labels[special] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(inputs[special], rows[special])
    replaced = labels != IGNORE_INDEX
    assert replaced.sum() > 10_000
    assert not np.isin(inputs[replaced], SPECIALS).any()
    assert inputs.min() >= 0 and inputs.max() < VOCAB
    # a row made of special tokens only has nothing to predict
    only = np.array([CLS, SEP, PAD, PAD])
    out, lab = mask_sequence(only, seed=0, epoch=0, sample_index=0, special_ids=SPECIALS, mask_id=MASK,
                             vocab_size=VOCAB)
    assert (lab == IGNORE_INDEX).all() and np.array_equal(out, only)


def test_pure_function_of_seed_epoch_and_sample() -> None:
    row = _rows(1)[0]
    kw = dict(special_ids=SPECIALS, mask_id=MASK, vocab_size=VOCAB)
    a = mask_sequence(row, seed=3, epoch=2, sample_index=99, **kw)
    b = mask_sequence(row.copy(), seed=3, epoch=2, sample_index=99, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in (dict(seed=4, epoch=2, sample_index=99), dict(seed=3, epoch=3, sample_index=99),
                  dict(seed=3, epoch=2, sample_index=100)):
        c = mask_sequence(row, **other, **kw)
        assert not np.array_equal(a[1], c[1]), other
    # the batch helper is the same function row by row, whatever the batch around a row
    rows = _rows(8)
    inputs, labels = mask_rows(rows, seed=3, epochs=np.arange(8), sample_indices=np.arange(100, 108), **kw)
    for r in range(8):
        x, y = mask_sequence(rows[r], seed=3, epoch=r, sample_index=100 + r, **kw)
        assert np.array_equal(inputs[r], x) and np.array_equal(labels[r], y)


def test_whole_word_masking() -> None:
    rng = np.random.default_rng(5)
    word_start = rng.random(VOCAB) < 0.6  # ~40% of the vocabulary are "##" continuations
    word_start[list(SPECIALS)] = True
    rows = _rows(1300, seed=2)
    inputs, labels = _mask(rows, MaskingConfig(whole_word_masking=True), word_start_table=word_start)
    candidates = ~np.isin(rows, SPECIALS)
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum() / candidates.sum() - 0.15) < 0.01
    for r in range(200):  # every word is selected entirely or not at all
        starts = word_start[rows[r]] | ~candidates[r]
        starts[0] = True
        word = np.cumsum(starts) - 1
        for w in np.unique(word[candidates[r]]):
            in_word = (word == w) & candidates[r]
            assert selected[r][in_word].all() or not selected[r][in_word].any()
    assert (labels[~candidates] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="word_starts"):
        mask_sequence(rows[0], seed=0, epoch=0, sample_index=0, special_ids=SPECIALS, mask_id=MASK,
                      vocab_size=VOCAB, config=MaskingConfig(whole_word_masking=True))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mlm_probability=0.0), "mlm_probability"),
    (dict(mlm_probability=1.5), "mlm_probability"),
    (dict(mask_probability=0.7), "sum to 1"),
    (dict(mask_probability=1.2, random_probability=-0.1, keep_probability=-0.1), "mask_probability"),
])
def test_config_is_validated(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


def test_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        mask_sequence(np.array([CLS, VOCAB, SEP]), seed=0, epoch=0, sample_index=0, special_ids=SPECIALS,
                      mask_id=MASK, vocab_size=VOCAB)
