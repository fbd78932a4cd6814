"""TokenImportance: EMA of per-id mean MLM loss, pinning, determinism, DP all-reduce on gloo."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

from sctd_dist.model.importance import HIGH_SCORE, LOW_SCORE, TokenImportance
from tests.distributed import run_ranks

V = 32
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
HIGH = (UNK, CLS, SEP, MASK)


def make(beta: float = 0.95, init: float = 10.0, dp_group=None) -> TokenImportance:
    return TokenImportance(V, high_ids=HIGH, pad_id=PAD, init_value=init, beta=beta, dp_group=dp_group)


def reference(table: list[float], steps, beta: float) -> list[float]:
    """Pure-Python reference: each step is a list of (id, loss) pairs (the union of all ranks)."""
    table = list(table)
    for pairs in steps:
        per_id: dict[int, list[float]] = {}
        for i, loss in pairs:
            if i >= 0 and math.isfinite(loss):
                per_id.setdefault(i, []).append(loss)
        for i, losses in per_id.items():
            table[i] = beta * table[i] + (1 - beta) * math.fsum(losses) / len(losses)
        for i in HIGH:
            table[i] = HIGH_SCORE
        table[PAD] = LOW_SCORE
    return table


def test_initial_table_pinned_and_registered_as_buffer() -> None:
    imp = make(init=7.5)
    s = imp.scores
    assert s.dtype == torch.float32 and s.shape == (V,) and not s.requires_grad
    assert list(imp.parameters()) == []
    assert "scores" in imp.state_dict()
    assert s[PAD].item() == LOW_SCORE
    assert all(s[i].item() == HIGH_SCORE for i in HIGH)
    others = [i for i in range(V) if i not in HIGH and i != PAD]
    assert torch.equal(s[others], torch.full((len(others),), 7.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(high_ids=(2, V)), "high id"),
        (dict(high_ids=(-1,)), "high id"),
        (dict(pad_id=V), "pad_id"),
        (dict(pad_id=CLS), "also listed"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_constructor_validation(kwargs, match) -> None:
    args = dict(vocab_size=V, high_ids=HIGH, pad_id=PAD, beta=0.9)
    args.update(kwargs)
    vocab = args.pop("vocab_size")
    with pytest.raises(ValueError, match=match):
        TokenImportance(vocab, **args)


def test_update_matches_reference_with_repeated_ids_and_ignores_minus_100() -> None:
    beta = 0.9
    imp = make(beta=beta)
    ids = torch.tensor([[7, 9, 7, -100], [12, 7, -100, 9]])
    loss = torch.tensor([[1.0, 4.0, 2.0, 99.0], [0.5, 6.0, 99.0, 2.0]])
    before = imp.scores.clone()
    imp.update(ids, loss)
    # Hand-computed: id 7 mean (1+2+6)/3 = 3, id 9 mean (4+2)/2 = 3, id 12 mean 0.5.
    assert imp.scores[7].item() == pytest.approx(0.9 * 10 + 0.1 * 3.0, abs=1e-6)
    assert imp.scores[9].item() == pytest.approx(0.9 * 10 + 0.1 * 3.0, abs=1e-6)
    assert imp.scores[12].item() == pytest.approx(0.9 * 10 + 0.1 * 0.5, abs=1e-6)
    unseen = [i for i in range(V) if i not in (7, 9, 12)]
    assert torch.equal(imp.scores[unseen], before[unseen])  # bit-exact: untouched


def test_multi_step_matches_python_reference() -> None:
    rng = random.Random(0)
    beta = 0.95
    imp = make(beta=beta)
    steps = []
    for _ in range(5):
        pairs = [(rng.choice([-100, *range(V)]), rng.uniform(0, 12)) for _ in range(64)]
        steps.append(pairs)
        imp.update(torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    ref = reference([10.0] * V, steps, beta)
    torch.testing.assert_close(imp.scores, torch.tensor(ref, dtype=torch.float32), rtol=1e-6, atol=1e-5)


def test_special_and_pad_repinned_after_update() -> None:
    imp = make(beta=0.0)  # beta 0: the score would become the loss itself
    ids = torch.tensor([UNK, CLS, SEP, MASK, PAD, 20])
    imp.update(ids, torch.full((6,), 0.25))
    assert all(imp.scores[i].item() == HIGH_SCORE for i in HIGH)
    assert imp.scores[PAD].item() == LOW_SCORE
    assert imp.scores[20].item() == 0.25


def test_all_ignored_and_nonfinite_losses_leave_table_unchanged() -> None:
    imp = make()
    imp.update(torch.tensor([20, 21]), torch.tensor([3.0, 3.0]))
    before = imp.scores.clone()
    imp.update(torch.full((4,), -100), torch.ones(4))
    imp.update(torch.tensor([20, 21, 22]), torch.tensor([float("nan"), float("inf"), -float("inf")]))
    imp.update(torch.empty(0, dtype=torch.long), torch.empty(0))
    assert torch.equal(imp.scores, before)
    assert torch.isfinite(imp.scores).all()


def test_update_validates_inputs() -> None:
    imp = make()
    with pytest.raises(ValueError, match="out of range"):
        imp.update(torch.tensor([3, V]), torch.ones(2))
    with pytest.raises(ValueError, match="elements"):
        imp.update(torch.tensor([3, 5]), torch.ones(3))
    with pytest.raises(ValueError, match="integer"):
        imp.update(torch.tensor([3.0]), torch.ones(1))


def test_update_is_deterministic_and_order_insensitive() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (4096,), generator=g)
    loss = torch.rand(4096, generator=g, dtype=torch.float32) * 10
    a, b, c = make(), make(), make()
    a.update(ids, loss)
    b.update(ids.clone(), loss.clone())
    perm = torch.randperm(4096, generator=g)
    c.update(ids[perm], loss[perm])
    assert torch.equal(a.scores, b.scores)  # bit-identical on a repeat
    torch.testing.assert_close(a.scores, c.scores, rtol=0, atol=1e-6)  # float64 sums: order-robust


def test_stats_are_exact_sums_and_counts() -> None:
    imp = make()
    ids = torch.tensor([5, 5, 8, -100, 5, 31])
    loss = torch.tensor([1.0, 2.0, 3.0, 9.0, 4.0, 0.5], dtype=torch.bfloat16)
    sums, counts = imp.per_id_loss_stats(ids, loss)
    assert sums.dtype == torch.float64 and counts.dtype == torch.float64
    exp_s = torch.zeros(V, dtype=torch.float64)
    exp_c = torch.zeros(V, dtype=torch.float64)
    exp_s[5], exp_c[5] = 7.0, 3
    exp_s[8], exp_c[8] = 3.0, 1
    exp_s[31], exp_c[31] = 0.5, 1
    assert torch.equal(sums, exp_s) and torch.equal(counts, exp_c)


def test_state_dict_roundtrip_and_dtype_casts_keep_fp32() -> None:
    imp = make()
    imp.update(torch.tensor([10, 11, 10]), torch.tensor([1.234567, 2.0, 3.0]))
    other = make()
    other.load_state_dict(imp.state_dict())
    assert torch.equal(other.scores, imp.scores)
    # DeepSpeed's bf16/fp16 paths call module.bfloat16()/half(): the table must stay exact fp32.
    exact = imp.scores.clone()
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), imp).bfloat16()
    assert model[0].weight.dtype == torch.bfloat16
    assert imp.scores.dtype == torch.float32 and torch.equal(imp.scores, exact)
    imp.half().double()
    assert imp.scores.dtype == torch.float32 and torch.equal(imp.scores, exact)


# --------------------------------------------------------------------------- DP=2 on real gloo
def _dp_rank_data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    n = 40 + 17 * rank  # different batch sizes per replica
    ids = torch.randint(0, 16, (n,), generator=g)  # small id range: heavy overlap across ranks
    ids[::7] = -100
    loss = torch.rand(n, generator=g) * 8
    return ids, loss


def _dp_worker(rank: int, world_size: int):
    dist.init_process_group("gloo")
    imp = make(beta=0.8, dp_group=dist.group.WORLD)
    local_only = make(beta=0.8, dp_group=None)  # None: documented as "no all-reduce"
    for step in range(3):
        ids, loss = _dp_rank_data(rank + 10 * step)
        imp.update(ids, loss)
        local_only.update(ids, loss)
    tables = [torch.empty(V) for _ in range(world_size)]
    dist.all_gather(tables, imp.scores)
    # Plain lists: tensors sent back through run_ranks' queue share storage with a process
    # that may already have exited. float32 -> Python float is exact.
    return imp.scores.tolist(), local_only.scores.tolist(), [t.tolist() for t in tables]


def test_dp2_replicas_hold_identical_table_equal_to_union_reference() -> None:
    results = run_ranks(_dp_worker, 2)
    (t0, l0, g0), (t1, l1, g1) = results
    assert t0 == t1, "replicas drifted apart"
    assert g0[0] == g0[1] == t0 and g1 == g0
    steps = []
    for step in range(3):
        pairs = []
        for r in range(2):
            ids, loss = _dp_rank_data(r + 10 * step)
            pairs += list(zip(ids.tolist(), loss.tolist()))
        steps.append(pairs)
    ref = torch.tensor(reference([10.0] * V, steps, 0.8), dtype=torch.float32)
    torch.testing.assert_close(torch.tensor(t0), ref, rtol=1e-6, atol=1e-5)
    # Without a DP group each replica only sees its own batch: the tables differ.
    assert l0 != l1
