"""`sctd_dist.parallel.kernels`: a compiled encoder layer computes what the eager one computes
(forward and backward), steps with a different number of masked positions compile nothing new,
and the attention-kernel probe names a kernel."""

from __future__ import annotations

import torch

from sctd_dist.parallel.kernels import compile_each, sdpa_backend
from tests.model.common import make_batch, small_config
from tests.parallel.test_tensor_parallel import LAYOUTS, layer_inputs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_compiled_layer_equals_eager_forward_and_backward(ctx1) -> None:
    from sctd_dist.model.bert import BertLayer

    cfg = small_config()  # no dropout: both sides must draw nothing
    torch.manual_seed(0)
    eager = BertLayer(cfg, ctx1)
    compiled = BertLayer(cfg, ctx1)
    compiled.load_state_dict(eager.state_dict())
    assert compile_each([compiled]) == 1
    for layout in LAYOUTS:
        torch.manual_seed(1)
        x, *rest = layer_inputs(layout, 1, torch.float32)
        grad_out = None
        results = []
        for layer in (eager, compiled):
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            y = layer(xi, *rest)
            grad_out = torch.randn_like(y) if grad_out is None else grad_out
            y.backward(grad_out)
            results.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (y_e, gx_e, gp_e), (y_c, gx_c, gp_c) = results
        assert _rel(y_c, y_e) <= 1e-5, layout
        assert _rel(gx_c, gx_e) <= 1e-5, layout
        for name, g in gp_e.items():
            # The key bias's gradient is zero up to rounding (softmax ignores a shift per query).
            scale = max(g.norm().item(), 1e-3 * max(v.norm().item() for v in gp_e.values()))
            assert (gp_c[name] - g).norm().item() / scale <= 1e-5, (layout, name)


class CountingBackend:
    """A dynamo backend that runs each captured graph as is and counts the captures."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def test_changing_masked_positions_compiles_nothing_new(ctx1) -> None:
    from sctd_dist.data.tokenizer import SpecialTokenIds
    from sctd_dist.model.config import TokenDropConfig
    from sctd_dist.model.pretraining import PretrainingModel

    torch._dynamo.reset()
    cfg = small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    special = SpecialTokenIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    model = PretrainingModel(cfg, TokenDropConfig(mode="sctd", sctd_interval=2), special, ctx1).train()
    backend = CountingBackend()
    compile_each(model.mlm.bert.encoder.layer, backend=backend)

    def step(seed: int, step: int) -> int:
        batch = make_batch(seed=seed)
        targets = (batch["labels"] >= 0).nonzero()[:seed]  # drop `seed` of the targets
        batch["labels"][targets[:, 0], targets[:, 1]] = -100
        model(batch, step=step).loss.backward()
        return int((batch["labels"] >= 0).sum())

    # Step 0 (a consistency step) and step 1 meet every layout: full, split, kept-only.
    step(0, 0)
    step(0, 1)
    warm = backend.graphs
    assert warm >= 3
    masked = {step(seed, s) for seed, s in ((1, 2), (2, 3), (3, 4), (4, 5))}
    assert len(masked) > 1  # the steps really differ in their number of masked positions
    assert backend.graphs == warm


def test_sdpa_backend_names_a_kernel() -> None:
    names = {"flash_attention", "efficient_attention", "cudnn_attention", "math"}
    for dropout, padded in ((0.0, False), (0.1, True)):
        assert sdpa_backend(2, 4, 16, 8, torch.float32, torch.device("cpu"), dropout, padded) in names


def test_flex_attention_serves_masked_layers_on_cuda_without_dropout_only() -> None:
    from sctd_dist.parallel.kernels import use_flex_attention

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_flex_attention(cuda, 0.0)
    assert not use_flex_attention(cuda, 0.1)  # FlexAttention has no dropout
    assert not use_flex_attention(cpu, 0.0)  # nor a backward on CPUs
