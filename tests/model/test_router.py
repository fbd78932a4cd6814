"""Router: selection rule, ties, special tokens, sequence-parallel slices, errors, gather/scatter,
and bit-identical routing across real gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sctd_dist.model.importance import TokenImportance
from sctd_dist.model.router import Routing, gather_tokens, num_kept, route, scatter_tokens
from tests.distributed import run_ranks

V = 64
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


def make_importance() -> TokenImportance:
    imp = TokenImportance(V, high_ids=(UNK, CLS, SEP, MASK), pad_id=PAD)
    # Distinct-ish scores for ordinary ids, with deliberate ties (ids 5..63 -> 20 levels).
    imp.scores[5:] = (torch.arange(5, V) % 20).float() * 0.5
    return imp


def reference_kept(ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, k: int, tp: int = 1):
    """Brute force per row and slice: sort by (-score, position), keep k/tp, ascending."""
    b, seq = ids.shape
    s_local, k_local = seq // tp, k // tp
    out = []
    for r in range(b):
        row = []
        for sl in range(tp):
            pos = range(sl * s_local, (sl + 1) * s_local)
            def key(p: int) -> tuple[float, int]:  # padding (mask 0) sorts last
                return (-table[ids[r, p]].item() if mask[r, p] else float("inf"), p)

            row += sorted(sorted(pos, key=key)[:k_local])
        out.append(row)
    return torch.tensor(out, dtype=torch.long)


def random_batch(b: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, seq), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(b, seq, dtype=torch.long)
    for r in range(b):  # ragged padding: row r has r*3 pads at the end
        n_pad = min(3 * r, seq - 2)
        if n_pad:
            ids[r, seq - n_pad :] = PAD
            mask[r, seq - n_pad :] = 0
        ids[r, seq - n_pad - 1] = SEP
    masked = torch.rand(b, seq, generator=g) < 0.15
    ids[masked & (mask == 1) & (ids != CLS) & (ids != SEP)] = MASK
    return ids, mask


# ------------------------------------------------------------------------------------ num_kept
def test_num_kept_rounds_half_up() -> None:
    assert num_kept(128, 0.5) == 64
    assert num_kept(125, 0.5) == 63  # 62.5 -> 63
    assert num_kept(10, 0.24) == 2 and num_kept(10, 0.25) == 3
    assert num_kept(128, 1.0) == 128
    assert num_kept(126, 0.5, tp_size=2, sequence_parallel=False) == 63  # TP without SP: any k
    assert num_kept(128, 0.5, tp_size=4, sequence_parallel=True) == 64


# A ratio outside (0, 1] is refused where it is set (tests/model/test_config.py); here: ratios
# that keep no token of this sequence length.
@pytest.mark.parametrize("ratio", [0.0, 0.001])
def test_num_kept_rejects_bad_ratio(ratio) -> None:
    with pytest.raises(ValueError, match="keep ratio"):
        num_kept(128, ratio)


def test_sp_k_not_divisible_names_nearest_valid_ratios() -> None:
    with pytest.raises(ValueError) as e:
        num_kept(126, 0.5, tp_size=2, sequence_parallel=True)
    msg = str(e.value)
    assert "k=63" in msg and "TP=2" in msg
    assert "0.492 (k=62)" in msg and "0.508 (k=64)" in msg
    # The suggestions really are valid.
    assert num_kept(126, 0.492, 2, True) == 62 and num_kept(126, 0.508, 2, True) == 64
    with pytest.raises(ValueError) as e:
        num_kept(128, 0.3, tp_size=4, sequence_parallel=True)  # k=38 -> 36 or 40
    assert "(k=36)" in str(e.value) and "(k=40)" in str(e.value)
    for part in str(e.value).split("use ")[1].split(" or "):
        r, k = part.split(" (k=")
        assert num_kept(128, float(r), 4, True) == int(k.rstrip(")"))


def test_sp_seq_not_divisible_by_tp() -> None:
    with pytest.raises(ValueError, match="sequence length 130 is not divisible by TP=4.*128 or 132"):
        num_kept(130, 0.5, tp_size=4, sequence_parallel=True)
    ids = torch.full((1, 130), 7)
    with pytest.raises(ValueError, match="not divisible by TP=4"):
        route(ids, None, make_importance(), 0.5, tp_size=4, sequence_parallel=True)


def test_route_input_validation() -> None:
    imp = make_importance()
    ids = torch.full((2, 8), 7)
    with pytest.raises(ValueError, match="tp_rank"):
        route(ids, None, imp, 0.5, tp_size=2, tp_rank=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="attention_mask shape"):
        route(ids, torch.ones(2, 7), imp, 0.5)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        route(ids[0], None, imp, 0.5)
    with pytest.raises(ValueError, match="keep ratio"):
        route(ids, None, imp, 0.0)


# --------------------------------------------------------------------------------------- route
def test_route_matches_bruteforce_and_is_ascending() -> None:
    imp = make_importance()
    ids, mask = random_batch(6, 32, seed=0)
    r = route(ids, mask, imp, 0.4)
    k = num_kept(32, 0.4)
    assert isinstance(r, Routing) and r.num_kept == k == 13
    assert r.kept.shape == (6, k) and r.kept.dtype == torch.long
    assert (r.kept.diff(dim=1) > 0).all()
    assert torch.equal(r.kept, reference_kept(ids, mask, imp.scores, k))
    assert r.kept_local is r.kept and r.kept_local.shape[1] == k
    # The raw scores tensor is accepted as well, with the same result; and it is repeatable.
    assert torch.equal(route(ids, mask, imp.scores, 0.4).kept, r.kept)


def test_ties_broken_by_lower_position() -> None:
    table = torch.zeros(V)
    ids = torch.full((2, 10), 9)
    assert torch.equal(route(ids, None, table, 0.3).kept, torch.tensor([[0, 1, 2]] * 2))
    table[11] = 1.0  # one higher token at position 7 jumps ahead; remaining ties by position
    ids[1, 7] = 11
    assert torch.equal(route(ids, None, table, 0.3).kept, torch.tensor([[0, 1, 2], [0, 1, 7]]))


@pytest.mark.parametrize("tp", [1, 2])
def test_heavy_ties_match_position_rule(tp: int) -> None:
    # Three score levels over 128 positions: long tie runs, where an unstable sort or topk
    # (both differ from the stable order on CPU at this size) would pick other positions.
    table = torch.tensor([0.0, 1.0, 2.0])
    ids = torch.randint(0, 3, (4, 128), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    r = route(ids, mask, table, 0.5, tp_size=tp, sequence_parallel=tp > 1)
    assert torch.equal(r.kept, reference_kept(ids, mask, table, 64, tp))


def test_specials_and_masks_kept_pads_dropped_first() -> None:
    imp = make_importance()
    imp.scores[5:] = 100.0  # ordinary tokens high, still far below the pinned 1e4
    ids = torch.tensor([[CLS, 20, MASK, 21, 22, MASK, 23, SEP, PAD, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    r = route(ids, mask, imp, 0.5)  # k = 6: CLS, SEP, 2x MASK + 2 ordinary (positions 1, 3)
    assert r.kept.tolist() == [[0, 1, 2, 3, 5, 7]]
    r = route(ids, mask, imp, 0.75)  # k = 9: all 8 real tokens, then the first pad
    assert r.kept.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert r.key_mask_kept.tolist() == [[True] * 8 + [False]]
    assert torch.equal(r.key_mask_all, mask.bool())


def test_attention_mask_beats_id_score() -> None:
    # A position masked out by attention_mask is dropped before any real token, even if its id
    # is pinned high (e.g. [SEP] inside padding) and even before real [PAD]-id tokens.
    imp = make_importance()
    ids = torch.tensor([[CLS, 10, 11, SEP, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0, 1, 1]])
    assert route(ids, mask, imp, 5 / 6).kept.tolist() == [[0, 1, 2, 4, 5]]


def test_keep_ratio_one_keeps_everything() -> None:
    imp = make_importance()
    ids, mask = random_batch(3, 16, seed=1)
    for sp, tp in ((False, 1), (True, 4)):
        r = route(ids, mask, imp, 1.0, tp_size=tp, tp_rank=tp - 1, sequence_parallel=sp)
        assert torch.equal(r.kept, torch.arange(16).expand(3, 16))
        assert torch.equal(r.key_mask_kept, r.key_mask_all)
    assert torch.equal(r.kept_local, torch.arange(4).expand(3, 4))


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_keeps_k_over_tp_per_slice(tp: int) -> None:
    imp = make_importance()
    seq = 32
    ids, mask = random_batch(5, seq, seed=tp)
    # Make slice 0 much more important than the rest: the unconstrained top-k would be unbalanced.
    ids[:, 1 : seq // tp] = MASK
    k = num_kept(seq, 0.5, tp, True)
    s_local, k_local = seq // tp, k // tp
    routes = [route(ids, mask, imp, 0.5, tp_size=tp, tp_rank=rank, sequence_parallel=True) for rank in range(tp)]
    kept = routes[0].kept
    assert kept.shape == (5, k) and (kept.diff(dim=1) > 0).all()
    slice_of = kept // s_local
    for sl in range(tp):
        assert ((slice_of == sl).sum(dim=1) == k_local).all()
    assert torch.equal(kept, reference_kept(ids, mask, imp.scores, k, tp))
    assert not torch.equal(kept, route(ids, mask, imp, 0.5).kept)  # SP constraint mattered
    for rank, r in enumerate(routes):
        assert torch.equal(r.kept, kept) and r.kept_local.shape[1] == k_local
        assert torch.equal(r.kept_local, kept[:, rank * k_local : (rank + 1) * k_local] - rank * s_local)
        assert ((0 <= r.kept_local) & (r.kept_local < s_local)).all()
    assert torch.equal(routes[0].key_mask_kept, torch.gather(mask.bool(), 1, kept))


# ------------------------------------------------------------------------ gather / scatter
def test_gather_scatter_match_manual_loop() -> None:
    g = torch.Generator().manual_seed(3)
    b, s, h, k = 3, 7, 5, 4
    hidden = torch.randn(b, s, h, generator=g)
    index = torch.stack([torch.randperm(s, generator=g)[:k].sort().values for _ in range(b)])
    values = torch.randn(b, k, h, generator=g)
    got = gather_tokens(hidden, index)
    merged = scatter_tokens(hidden, index, values)
    expected = hidden.clone()
    for r in range(b):
        for j in range(k):
            assert torch.equal(got[r, j], hidden[r, index[r, j]])
            expected[r, index[r, j]] = values[r, j]
    assert torch.equal(merged, expected)
    assert not torch.equal(merged, hidden)  # out of place: base untouched
    with pytest.raises(ValueError, match="values shape"):
        scatter_tokens(hidden, index, values[:, :2])


def test_gather_scatter_gradients() -> None:
    g = torch.Generator().manual_seed(4)
    b, s, h = 2, 6, 3
    index = torch.tensor([[0, 2, 5], [1, 3, 4]])
    base = torch.randn(b, s, h, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(b, 3, h, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gather_tokens(x, index), (base,))
    assert torch.autograd.gradcheck(lambda x, v: scatter_tokens(x, index, v), (base, values))
    # Explicitly: replaced rows of base get zero gradient, the others pass straight through.
    w = torch.randn(b, s, h, dtype=torch.float64, generator=g)
    (scatter_tokens(base, index, values) * w).sum().backward()
    replaced = torch.zeros(b, s, dtype=torch.bool)
    replaced[torch.arange(b)[:, None], index] = True
    assert torch.equal(base.grad[replaced], torch.zeros_like(base.grad[replaced]))
    assert torch.equal(base.grad[~replaced], w[~replaced])
    assert torch.equal(values.grad, gather_tokens(w, index))


# ------------------------------------------------------------------ real gloo ranks (TP=2)
def _tp_worker(rank: int, world_size: int):
    dist.init_process_group("gloo")
    imp = make_importance()
    # Identical inputs on every rank (as TP ranks receive them), built from the same seed.
    ids, mask = random_batch(4, 64, seed=123)
    plain = route(ids, mask, imp, 0.5)
    sp = route(ids, mask, imp, 0.5, tp_size=world_size, tp_rank=rank, sequence_parallel=True)
    gathered = [torch.empty_like(plain.kept) for _ in range(world_size)]
    dist.all_gather(gathered, plain.kept)
    gathered_sp = [torch.empty_like(sp.kept) for _ in range(world_size)]
    dist.all_gather(gathered_sp, sp.kept)
    # Each rank's SP-local selection, shifted by its slice offset and all-gathered along the
    # sequence, must rebuild the global kept positions (what the SP all-gather relies on).
    local_global = sp.kept_local + rank * (64 // world_size)
    parts = [torch.empty_like(local_global) for _ in range(world_size)]
    dist.all_gather(parts, local_global)
    # Plain lists: tensors sent back through run_ranks' queue share storage with a process
    # that may already have exited.
    return (
        [t.tolist() for t in gathered],
        [t.tolist() for t in gathered_sp],
        torch.cat(parts, dim=1).tolist(),
        sp.kept.tolist(),
    )


def test_identical_selection_across_gloo_ranks() -> None:
    results = run_ranks(_tp_worker, 2)
    for gathered, gathered_sp, rebuilt, sp_kept in results:
        assert gathered[0] == gathered[1]
        assert gathered_sp[0] == gathered_sp[1]
        assert rebuilt == sp_kept
    ids, mask = random_batch(4, 64, seed=123)
    assert results[0][0][0] == route(ids, mask, make_importance(), 0.5).kept.tolist()
    assert results[0][1][0] != results[0][0][0]  # the SP constraint changed the selection
