"""The training loader: batch contents, exact resume, DP-size independence, TP-identical batches."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sctd_dist.data.dataset import PackedDataset
from sctd_dist.data.loader import PretrainingDataLoader, ValidationDataLoader
from sctd_dist.data.masking import MaskingConfig, mask_sequence
from tests.distributed import run_ranks

G = 24  # global batch


def _loader(data_dir, dp_rank=0, dp_size=1, micro=4, consumed=0, **kw) -> PretrainingDataLoader:
    return PretrainingDataLoader(PackedDataset(data_dir), global_batch_size=kw.pop("global_batch_size", G),
                                 micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, seed=kw.pop("seed", 5),
                                 consumed_samples=consumed, **kw)


ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")  # the [micro, seq] entries


def _global_batch(loaders: list[PretrainingDataLoader], consumed: int) -> dict[str, torch.Tensor]:
    """The step's samples in stream order: micro-step j of rank r covers one contiguous slice."""
    per_rank = [ld.batches_for_step(consumed) for ld in loaders]
    pieces = [per_rank[r][j] for j in range(loaders[0].grad_accum) for r in range(len(loaders))]
    return {k: torch.cat([p[k] for p in pieces]) for k in ROW_KEYS}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contents(prepared) -> None:
    ld = _loader(prepared, micro=6, dp_size=2, dp_rank=1)
    ds = ld.dataset
    share = ld.padded_share(3)  # what the start record says: read from the rows, no masking
    expected = [bool(b["padded"]) for step in range(3) for b in ld.batches_for_step(step * G)]
    assert share == sum(expected) / len(expected)
    batches = next(ld)
    assert ld.grad_accum == 2 and len(batches) == 2 and ld.consumed_samples == G
    rows, epochs = ld.sample_indices_for_step(0)
    for j, b in enumerate(batches):
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels",
                          "masked_positions", "padded", "document_ids"}
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "document_ids"):
            assert b[k].shape == (6, ds.seq_length) and b[k].dtype == torch.int64
        # Where the MLM head runs, and whether attention needs a mask, come with the batch.
        assert torch.equal(b["masked_positions"], torch.nonzero(b["labels"].reshape(-1) != -100).squeeze(1))
        assert b["padded"].dtype == torch.bool and b["padded"].dim() == 0
        assert bool(b["padded"]) == bool((b["attention_mask"] == 0).any())
        original = torch.from_numpy(ds.get_rows(rows[j]))
        assert torch.equal(b["attention_mask"], (original != ds.special_ids.pad).long())
        assert not b["token_type_ids"].any()
        predicted = b["labels"] != -100
        assert torch.equal(b["labels"][predicted], original[predicted])
        assert torch.equal(b["input_ids"][~predicted], original[~predicted])
        assert 0.08 < predicted.sum() / (b["attention_mask"].sum() - 2 * 6) < 0.25
        # the masks are exactly mask_sequence of (seed, epoch, dataset row)
        x, y = mask_sequence(original[0].numpy(), seed=5, epoch=int(epochs[j, 0]), sample_index=int(rows[j, 0]),
                             special_ids=ds.special_ids.all, mask_id=ds.special_ids.mask, vocab_size=ds.vocab_size)
        assert np.array_equal(b["input_ids"][0].numpy(), x) and np.array_equal(b["labels"][0].numpy(), y)


def test_resume_at_any_point_equals_the_uninterrupted_stream(prepared) -> None:
    ref = _loader(prepared, global_batch_size=48, micro=8)
    steps = ref.steps_per_epoch + 3  # crosses an epoch boundary
    uninterrupted = [next(ref) for _ in range(steps)]
    assert ref.epoch == 1
    for stop in (0, 1, ref.steps_per_epoch - 1, ref.steps_per_epoch, steps - 1):
        first = _loader(prepared, global_batch_size=48, micro=8)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        resumed = _loader(prepared, global_batch_size=48, micro=8)
        resumed.load_state_dict(state)
        assert resumed.consumed_samples == 48 * stop and resumed.epoch == state["epoch"]
        for s in range(stop, steps):
            got = next(resumed)
            assert all(_equal(a, b) for a, b in zip(got, uninterrupted[s])), (stop, s)


def test_positioning_is_constant_time(prepared) -> None:
    ld = _loader(prepared)
    far = 10**12 * G  # about 4e10 epochs in: no skipping through earlier batches
    t0 = time.perf_counter()
    batches = ld.batches_for_step(far)
    assert time.perf_counter() - t0 < 1.0 and len(batches) == ld.grad_accum
    ld.load_state_dict({"consumed_samples": far})
    assert all(_equal(a, b) for a, b in zip(next(ld), batches))


def test_epochs_visit_every_row_once(prepared) -> None:
    ld = _loader(prepared, global_batch_size=G, micro=G)
    n = len(ld.dataset)
    seen = []
    for _ in range(ld.steps_per_epoch):
        rows, epochs = ld.sample_indices_for_step(ld.consumed_samples)
        assert (epochs == 0).all()
        seen += rows.reshape(-1).tolist()
        next(ld)
    assert len(seen) == len(set(seen)) == n - n % G
    assert ld.epoch == 1
    next_rows, next_epochs = ld.sample_indices_for_step(ld.consumed_samples)
    assert (next_epochs == 1).all() and next_rows.reshape(-1).tolist() != seen[:G]


def test_dp1_and_dp2_see_the_same_global_batches(prepared) -> None:
    one = [_loader(prepared, micro=4)]
    two = [_loader(prepared, dp_rank=r, dp_size=2, micro=4) for r in range(2)]
    three = [_loader(prepared, dp_rank=r, dp_size=3, micro=2) for r in range(3)]  # also another micro batch
    assert one[0].grad_accum == 6 and two[0].grad_accum == 3 and three[0].grad_accum == 4
    for step in range(4):
        ref = _global_batch(one, step * G)
        assert _equal(ref, _global_batch(two, step * G))
        assert _equal(ref, _global_batch(three, step * G))
    # different ranks get different samples
    assert not torch.equal(two[0].batches_for_step(0)[0]["input_ids"], two[1].batches_for_step(0)[0]["input_ids"])


def test_resume_with_another_dp_size(prepared) -> None:
    single = _loader(prepared, micro=4)
    for _ in range(3):
        next(single)
    state = single.state_dict()
    expected = [_global_batch([single], single.consumed_samples + k * G) for k in range(3)]
    pair = [_loader(prepared, dp_rank=r, dp_size=2, micro=12) for r in range(2)]
    for ld in pair:
        ld.load_state_dict(state)
    for k in range(3):
        got = [next(ld) for ld in pair]
        merged = {key: torch.cat([got[r][0][key] for r in range(2)]) for key in expected[k]}
        assert _equal(merged, expected[k])


def test_state_and_argument_errors(prepared) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        _loader(prepared, micro=5, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        _loader(prepared, dp_rank=2, dp_size=2)
    ld = _loader(prepared)
    state = ld.state_dict()
    assert set(state) >= {"consumed_samples", "epoch"}
    # Another seed, row count or global batch is the resume plan's to refuse or report
    # (tests/test_run_record.py); the loader only takes the position.
    wider = _loader(prepared, global_batch_size=2 * G)
    wider.load_state_dict({**state, "consumed_samples": 3 * G})
    assert wider.consumed_samples == 3 * G


def test_whole_word_masking_through_the_loader(prepared, hf_tokenizer) -> None:
    ld = _loader(prepared, masking=MaskingConfig(whole_word_masking=True))
    batch = next(ld)[0]
    vocab = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    labels = batch["labels"].numpy()
    rows = ld.dataset.get_rows(ld.sample_indices_for_step(0)[0][0])
    specials = set(ld.dataset.special_ids.all)
    checked = 0
    for r in range(len(rows)):
        for i in range(1, rows.shape[1]):
            # A continuation shares its predecessor's fate, unless the predecessor can never be
            # masked ([CLS] when packing split a word, [UNK]): then it stands as its own word.
            if vocab[rows[r, i]].startswith("##") and int(rows[r, i - 1]) not in specials:
                assert (labels[r, i] != -100) == (labels[r, i - 1] != -100)
                checked += 1
    assert checked > 5


def test_validation_loader(prepared) -> None:
    val = PackedDataset(prepared, "validation")
    n = len(val)
    loaders = [ValidationDataLoader(val, micro_batch_size=4, dp_rank=r, dp_size=3, seed=5) for r in range(3)]
    assert len({len(ld) for ld in loaders}) == 1 and len(loaders[0]) == -(-n // 12)
    seen = []
    for r, ld in enumerate(loaders):
        first_pass, second_pass = ([ld.batch(i) for i in range(len(ld))] for _ in range(2))
        assert all(_equal(a, b) for a, b in zip(first_pass, second_pass))  # fixed masks
        for step, b in enumerate(first_pass):
            idx = ld.sample_indices(step)
            seen += idx[idx >= 0].tolist()
            filler = torch.from_numpy(idx < 0)
            assert (b["labels"][filler] == -100).all()
            assert (b["attention_mask"][filler].sum(1) == 2).all()  # [CLS] [SEP]: no empty attention row
    assert sorted(seen) == list(range(n))
    # masks depend on the row only, not on the DP layout
    solo = ValidationDataLoader(val, micro_batch_size=1, dp_rank=0, dp_size=1, seed=5)
    assert torch.equal(solo.batch(4)["input_ids"][0], loaders[1].batch(0)["input_ids"][0])


def _tp_dp_rank(rank: int, world_size: int, data_dir: str) -> list[dict]:
    """On 4 gloo ranks = TP2 x DP2: build this rank's loader and all-gather its batches."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tp = 2
    ld = _loader(data_dir, dp_rank=rank // tp, dp_size=world_size // tp, micro=4)
    ld.load_state_dict({"consumed_samples": 3 * G, "epoch": 0})
    mine = [{k: v.numpy() for k, v in b.items()} for b in next(ld) + next(ld)]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def test_tensor_parallel_ranks_get_identical_batches(prepared) -> None:
    results = run_ranks(_tp_dp_rank, 4, str(prepared))
    views = results[0]
    assert all(len(r) == 4 for r in results)
    assert all(all(np.array_equal(a[k], b[k]) for a, b in zip(r, views[i]) for k in a)  # every rank saw the same
               for res in results for i, r in enumerate(res))
    for tp_a, tp_b in ((0, 1), (2, 3)):  # same replica: bit-identical
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(views[tp_a], views[tp_b]) for k in a)
    assert not np.array_equal(views[0][0]["input_ids"], views[2][0]["input_ids"])  # replicas differ
    # and the two replicas together are the single-process global batches
    single = _loader(prepared, micro=4)
    for s, consumed in enumerate((3 * G, 4 * G)):
        ref = _global_batch([single], consumed)
        acc = 3  # 24 / (4 x 2)
        pieces = [views[2 * d][s * acc + j] for j in range(acc) for d in range(2)]
        for k in ref:
            assert np.array_equal(np.concatenate([p[k] for p in pieces]), ref[k].numpy())
