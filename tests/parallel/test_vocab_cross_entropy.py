"""The fused decoder + cross-entropy (`sctd_dist.parallel.vocab_cross_entropy`) against the plain
chain `F.linear` -> `F.cross_entropy` (and `argmax` for accuracy): loss, number correct and every
gradient under a non-uniform upstream gradient, in fp64 / fp32 / bf16 and under autocast, with an
empty batch, with padded vocabulary entries, and vocabulary-sharded over 2 gloo ranks; and it
keeps a single [n, V] buffer for the backward where the plain chain keeps more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sctd_dist.parallel.vocab_cross_entropy import decoder_cross_entropy
from tests.distributed import run_ranks

N, H, V, PADDED = 23, 16, 90, 96  # the last PADDED - V entries are vocabulary padding


def problem(dtype: torch.dtype, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(PADDED, generator=g) * 0.1
    bias[V:] = -1e4  # what the model adds to padded entries
    return {"h": torch.randn(n, H, generator=g).to(dtype),
            "weight": torch.randn(PADDED, H, generator=g).to(dtype),
            "bias": bias.to(dtype), "targets": torch.randint(0, V, (n,), generator=g),
            "upstream": torch.rand(n, generator=g, dtype=torch.float64)}


def reference(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unfused chain in fp64: per-token loss, number correct and gradients."""
    h, w, b = (p[k].double().requires_grad_() for k in ("h", "weight", "bias"))
    logits = F.linear(h, w, b)
    loss = F.cross_entropy(logits, p["targets"], reduction="none")
    (loss * p["upstream"]).sum().backward()
    return {"loss": loss.detach(), "correct": (logits.argmax(-1) == p["targets"]).sum().double(),
            "h": h.grad, "weight": w.grad, "bias": b.grad}


def fused(p: dict[str, torch.Tensor], shard: slice = slice(None), start: int = 0,
          group=None) -> dict[str, torch.Tensor]:
    h = p["h"].clone().requires_grad_()
    w = p["weight"][shard].clone().requires_grad_()
    b = p["bias"][shard].clone().requires_grad_()
    loss, correct = decoder_cross_entropy(h, w, b, p["targets"], start, group)
    (loss * p["upstream"].to(loss.dtype)).sum().backward()
    return {"loss": loss.detach(), "correct": correct, "h": h.grad, "weight": w.grad, "bias": b.grad}


def assert_matches(got: dict, ref: dict, tol: float, shard: slice = slice(None)) -> None:
    assert got["loss"].dtype == torch.promote_types(got["h"].dtype, torch.float32)
    assert float(got["correct"]) == float(ref["correct"])
    for key in ("loss", "h", "weight", "bias"):
        want = ref[key][shard] if key in ("weight", "bias") else ref[key]
        err = (got[key].double() - want).abs().max().item() / want.abs().max().item()
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype, tol",
                         [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 3e-2)],
                         ids=["fp64", "fp32", "bf16"])
def test_equals_linear_then_cross_entropy(dtype: torch.dtype, tol: float) -> None:
    p = problem(dtype)  # the fp64 reference starts from the same (rounded) inputs
    got = fused(p)
    assert_matches(got, reference(p), tol)
    assert (got["weight"][V:] == 0).all() and (got["bias"][V:] == 0).all()  # padding never learns


def test_under_autocast_gradients_come_back_in_the_parameters_dtype() -> None:
    """fp32 inputs, bf16 logits (what autocast makes of the GEMM), against the plain chain under
    the same autocast; the backward runs outside autocast and must not mix dtypes."""
    p = problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(p)
        h, w, b = (p[k].clone().requires_grad_() for k in ("h", "weight", "bias"))
        loss = F.cross_entropy(F.linear(h, w, b).float(), p["targets"], reduction="none")
    (loss * p["upstream"].float()).sum().backward()
    assert {got[k].dtype for k in ("h", "weight", "bias")} == {torch.float32}
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    for key, ref in (("h", h.grad), ("weight", w.grad), ("bias", b.grad)):
        err = (got[key] - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 3e-2, f"{key}: relative error {err:.2e}"


def test_a_target_that_wins_counts_as_correct() -> None:
    p = problem(torch.float64)
    p["targets"] = F.linear(p["h"], p["weight"], p["bias"]).argmax(-1)  # every row right
    p["targets"][:5] = (p["targets"][:5] + 1) % V  # five wrong
    assert float(fused(p)["correct"]) == N - 5


def test_nothing_to_predict_is_an_exact_zero_that_reaches_every_weight() -> None:
    p = problem(torch.float32, n=0)
    h, w, b = (p[k].clone().requires_grad_() for k in ("h", "weight", "bias"))
    loss, correct = decoder_cross_entropy(h, w, b, p["targets"])
    loss.sum().backward()
    assert loss.shape == (0,) and float(correct) == 0.0
    assert w.grad is not None and b.grad is not None
    assert not w.grad.any() and not b.grad.any()


def _saved_numel(fn) -> int:
    """Elements of every tensor autograd keeps for the backward of what `fn` builds."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_keeps_one_logit_sized_buffer_for_the_backward() -> None:
    p = problem(torch.float32, n=64)
    h, w, b = (p[k].clone().requires_grad_() for k in ("h", "weight", "bias"))
    fused_saved = _saved_numel(lambda: decoder_cross_entropy(h, w, b, p["targets"]))
    plain_saved = _saved_numel(lambda: F.cross_entropy(F.linear(h, w, b), p["targets"], reduction="none"))
    logits = 64 * PADDED
    assert fused_saved == h.numel() + w.numel() + logits  # the inputs and the logits' gradient
    assert plain_saved - (h.numel() + w.numel()) >= logits  # the log-probabilities, at least


def tp2_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    p = problem(torch.float64, seed=3)
    shard = slice(rank * PADDED // world, (rank + 1) * PADDED // world)
    got = fused(p, shard, shard.start, dist.group.WORLD)
    dist.all_reduce(got["h"])  # what copy_to_tensor_parallel's backward does with the rows' grads
    assert_matches(got, reference(p), 1e-12, shard)
    return {"loss": got["loss"]}


def test_vocab_sharded_over_two_ranks_equals_the_whole_vocabulary() -> None:
    losses = [r["loss"] for r in run_ranks(tp2_rank, 2)]
    assert torch.equal(losses[0], losses[1])  # every rank reports the same loss
