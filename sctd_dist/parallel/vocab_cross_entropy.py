"""The MLM decoder and its cross-entropy as one autograd function, over a vocabulary-sharded weight.

What the unfused chain (`F.linear`, a float copy, `cross_entropy`, an `argmax` for accuracy)
costs beyond its GEMMs is memory passes over the [n, V] logits: log-softmax forward, an argmax,
a zero-filled one-hot gradient, log-softmax backward, the bias-gradient sum, and the scaling of
the gradient by the upstream one. Here the forward turns the logits into the loss's gradient in
place (softmax minus the one-hot target), which is all the backward needs:

    forward   logits = h W^T + b;  P = softmax(logits) in place;  G = P - onehot(target)
              loss_i = logsumexp_i - logit_i[target];  correct_i = (logit_i[target] is the max)
    backward  with the upstream gradient g [n] folded into the small operands instead of G:
              dh = diag(g) (G W),  dW = G^T (diag(g) h),  db = G^T g

Under tensor parallelism each rank holds a vocabulary shard: the row maxima, the softmax
normalisers and the target logits are combined with one all-reduce each (the softmax of a shard
is rescaled to the global normaliser in place). The input `h` arrives through
`copy_to_tensor_parallel`, whose backward sums `dh` over the group.

The weight's gradient goes through the tied-embedding hand-over (`tied_embedding`) when the
weight is the word embeddings'. Exact ties of the maximum logit count as correct for every
target at the maximum (the probability of a tie between float logits is nil in practice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sctd_dist.parallel.tied_embedding import TiedGradient, hand_over


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


class _DecoderCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, vocab_start: int, group: dist.ProcessGroup | None,
                slot: TiedGradient | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(h, weight, bias)
        # The softmax and the loss in fp32 at least, whatever the model's dtype (no copy in fp32).
        probs = _at_least_fp32(logits)
        n, shard = probs.shape
        local = targets - vocab_start
        mine = (local >= 0) & (local < shard)
        local = local.masked_fill(~mine, 0)
        rows = torch.arange(n, device=probs.device)
        target_logit = _all_reduce(probs[rows, local] * mine, dist.ReduceOp.SUM, group)
        shard_max = probs.amax(dim=-1)
        # In place: the logits are not needed once their softmax exists (an out-of-place
        # softmax would also pay page faults on a fresh [n, V] buffer every step).
        torch.softmax(probs, -1, out=probs)
        # The largest probability of a shard's softmax is exp(0) / its normaliser.
        shard_norm = probs.amax(dim=-1).reciprocal()
        if group is None:
            row_max, log_norm = shard_max, shard_norm.log()
        else:
            row_max = _all_reduce(shard_max.clone(), dist.ReduceOp.MAX, group)
            rescaled = shard_norm * torch.exp(shard_max - row_max)  # this shard's part of the sum
            norm = _all_reduce(rescaled.clone(), dist.ReduceOp.SUM, group)
            probs.mul_((rescaled / norm)[:, None])  # the shard's softmax -> the global one
            log_norm = norm.log()
        per_token = row_max + log_norm - target_logit
        num_correct = (target_logit == row_max).sum().float()
        # Minus the one-hot target on the shard that holds it (adding 0 elsewhere: no host sync).
        probs.index_put_((rows, local), -mine.to(probs.dtype), accumulate=True)
        grad_logits = probs.to(logits.dtype)
        ctx.save_for_backward(h, weight, grad_logits)
        ctx.slot = slot
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(num_correct)
        return per_token, num_correct

    @staticmethod
    def backward(ctx, grad_per_token: torch.Tensor | None, _grad_correct: torch.Tensor | None):
        h, weight, grad_logits = ctx.saved_tensors
        if grad_per_token is None:
            grad_per_token = torch.zeros(grad_logits.shape[0], device=grad_logits.device)
        g = _at_least_fp32(grad_per_token)
        # The GEMMs run in the logits' dtype, as the forward's did (under autocast the inputs may
        # be fp32 and the logits bf16; the backward runs outside autocast); each gradient is
        # returned in its input's dtype. Every cast is a no-op without autocast.
        dtype = grad_logits.dtype
        grad_h = grad_bias = grad_weight = None
        if ctx.needs_input_grad[0]:  # the [n, hidden] product scaled in fp32 (a no-op copy in fp32)
            grad_h = _at_least_fp32(grad_logits.mm(weight.to(dtype))).mul_(g[:, None]).to(h.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.t().mv(g.to(dtype)).to(ctx.bias_dtype)
        if ctx.needs_input_grad[1]:
            scaled = (_at_least_fp32(h) * g[:, None]).to(dtype)
            grad_weight = hand_over(ctx.slot, grad_logits.t().mm(scaled).to(weight.dtype))
        return grad_h, grad_weight, grad_bias, None, None, None, None


def decoder_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, vocab_start: int = 0,
                          group: dist.ProcessGroup | None = None,
                          slot: TiedGradient | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits `h W^T + b` over a vocabulary sharded across `group`.

    h: [n, hidden], the same rows on every rank of `group`; weight: [V/tp, hidden], this rank's
    shard starting at global id `vocab_start`; targets: [n] global ids. `group` None: one shard.
    Returns (per-token loss [n] in fp32, number of rows whose target has the largest logit).
    `slot`: the tied word-embedding pass that receives the weight's gradient (None: returned)."""
    return _DecoderCrossEntropy.apply(h, weight, bias, targets, vocab_start, group, slot)
