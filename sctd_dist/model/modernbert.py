"""ModernBERT for masked-LM pretraining, tensor parallel, with the token-dropping layer schedule.

The block of transformers' `ModernBertForMaskedLM` (pre-norm, rotary positions, GeGLU, no
biases, global layers every `global_attn_every_n_layers` and sliding-window layers between
them) under the same module names, so a state dict maps 1:1 (`sctd_dist.hf`). The fused `Wqkv`
and `Wi` are column-parallel with one slice of each fused block per rank, `Wo`s row-parallel;
activations are [batch, seq, hidden], sequence slices between layers under sequence
parallelism. Token dropping follows BERT's schedule (`sctd_dist.model.bert`); kept tokens carry
their original positions into the rotary angles and the sliding window
(`sctd_dist.model.attention_masks`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sctd_dist.model.attention_masks import PhaseMasks, TokenRows, all_rows, phase_masks
from sctd_dist.model.bert import EncoderOutput, MLMOutput, masked_lm
from sctd_dist.model.decoder import add_vocab_bias, tied_decode
from sctd_dist.model.modernbert_config import ModernBertModelConfig
from sctd_dist.model.rotary import apply_rotary, inverse_frequencies, rotary_angles
from sctd_dist.model.router import Routing, gather_tokens, scatter_tokens
from sctd_dist.parallel import layers as tp
from sctd_dist.parallel import sharded_ops
from sctd_dist.parallel.kernels import use_flex_attention
from sctd_dist.parallel.random import SHARDED_RNG, checkpoint_context_fn
from sctd_dist.parallel.state import ParallelContext

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
Angles = tuple[torch.Tensor, torch.Tensor]


def _out_std(cfg: ModernBertModelConfig) -> float:
    """ModernBERT's smaller initialisation of the projections that feed the residual stream."""
    return cfg.initializer_range / math.sqrt(2.0 * cfg.num_hidden_layers)


def _sharded_dropout(x: torch.Tensor, p: float, training: bool, ctx: ParallelContext) -> torch.Tensor:
    """Dropout of TP-sharded activations: each rank draws its own mask (the sharded stream)."""
    if not training or p == 0.0:
        return x
    if ctx.tp_size == 1:
        return F.dropout(x, p, True)
    if torch.compiler.is_compiling():
        return x * sharded_ops.sharded_dropout_mask(x.detach(), p)
    with SHARDED_RNG.fork(ctx.device):
        return F.dropout(x, p, True)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.tok_embeddings = tp.vocab_parallel_embedding(
            cfg.padded_vocab_size(ctx.tp_size), cfg.hidden_size, ctx, cfg.initializer_range,
            real_rows=cfg.vocab_size)
        self.norm = tp.ParallelLayerNorm(cfg.hidden_size, cfg.norm_eps, ctx, bias=cfg.norm_bias)
        self.drop = tp.ParallelDropout(cfg.embedding_dropout, ctx)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(tp.split_to_sequence(self.tok_embeddings(input_ids), self.ctx)))


class ModernBertAttention(nn.Module):
    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        h = cfg.hidden_size
        self.Wqkv = tp.column_parallel_linear(h, 3 * h, ctx, cfg.initializer_range, bias=False, stride=3)
        self.Wo = tp.row_parallel_linear(h, h, ctx, _out_std(cfg), bias=False)
        self.heads = cfg.num_attention_heads // ctx.tp_size
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_dropout
        self.out_drop = tp.ParallelDropout(cfg.attention_dropout, ctx)

    def forward(self, x: torch.Tensor, query_index: torch.Tensor | None, mask: torch.Tensor | None,
                angles_q: Angles, angles_k: Angles) -> torch.Tensor:
        """Keys/values from all rows of `x` [b, s, h]; queries from the rows at `query_index`
        (None: all rows). Returns this rank's rows of the projected output."""
        b, s, _ = x.shape
        qkv = self.Wqkv(x)[0].view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [b, heads, s, head_dim]
        if query_index is not None:
            q = torch.gather(q, 2, query_index[:, None, :, None].expand(-1, self.heads, -1, self.head_dim))
        q, k = apply_rotary(q, angles_q), apply_rotary(k, angles_k)
        out = tp.attention(q, k, v, mask, self.dropout_p if self.training else 0.0, self.ctx)
        out = out.transpose(1, 2).reshape(b, q.shape[2], self.heads * self.head_dim)
        return self.out_drop(tp.row_parallel_forward(self.Wo, out, self.ctx))


class ModernBertMLP(nn.Module):
    """GeGLU: `Wi` to input|gate, act(input) * gate, `Wo` (row-parallel)."""

    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.Wi = tp.column_parallel_linear(h, 2 * f, ctx, cfg.initializer_range, bias=False, stride=2)
        self.Wo = tp.row_parallel_linear(f, h, ctx, _out_std(cfg), bias=False)
        self.act = _ACTIVATIONS[cfg.hidden_activation]
        self.dropout_p = cfg.mlp_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x)[0].chunk(2, dim=-1)
        inner = _sharded_dropout(self.act(inp) * gate, self.dropout_p, self.training, self.ctx)
        return tp.row_parallel_forward(self.Wo, inner, self.ctx)


class ModernBertEncoderLayer(nn.Module):
    """One pre-norm layer. With `query_index` it is the token-dropping split layer: queries (and
    the output) only at the kept rows, keys/values over all rows."""

    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext, index: int) -> None:
        super().__init__()
        self.ctx = ctx
        # Layer 0 has no attention norm: the embedding norm precedes it (as in transformers).
        self.attn_norm = (nn.Identity() if index == 0
                          else tp.ParallelLayerNorm(cfg.hidden_size, cfg.norm_eps, ctx, bias=cfg.norm_bias))
        self.attn = ModernBertAttention(cfg, ctx)
        self.mlp_norm = tp.ParallelLayerNorm(cfg.hidden_size, cfg.norm_eps, ctx, bias=cfg.norm_bias)
        self.mlp = ModernBertMLP(cfg, ctx)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, angles_q: Angles, angles_k: Angles,
                query_index: torch.Tensor | None = None,
                query_index_local: torch.Tensor | None = None) -> torch.Tensor:
        """x: this rank's rows [b, s_local, h]; mask [b, 1, q, k] or None; angles of the query
        and key rows. query_index / query_index_local: kept positions in the full sequence / in
        this rank's slice. Returns the layer output at the query rows of this rank."""
        full = tp.enter_tp_region(self.attn_norm(x), self.ctx)
        residual = x if query_index is None else gather_tokens(x, query_index_local)
        a = residual + self.attn(full, query_index, mask, angles_q, angles_k)
        return a + self.mlp(tp.enter_tp_region(self.mlp_norm(a), self.ctx))


class ModernBertModel(nn.Module):
    """Embeddings, layers and the final norm, run on the token-dropping schedule."""

    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ModernBertEmbeddings(cfg, ctx)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(cfg, ctx, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = tp.ParallelLayerNorm(cfg.hidden_size, cfg.norm_eps, ctx, bias=cfg.norm_bias)
        self.register_buffer("global_inv_freq", inverse_frequencies(cfg.head_dim, cfg.global_rope_theta),
                             persistent=False)
        self.register_buffer("local_inv_freq", inverse_frequencies(cfg.head_dim, cfg.local_rope_theta),
                             persistent=False)
        self.activation_checkpointing = cfg.activation_checkpointing
        # Masked layers as FlexAttention block masks where that kernel serves (CUDA, no dropout).
        self.flex_attention = use_flex_attention(ctx.device, cfg.attention_dropout)

    def _run(self, layer: ModernBertEncoderLayer, *args) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, context_fn=checkpoint_context_fn)
        return layer(*args)

    def _plan(self, rows: TokenRows, routing: Routing | None, padded: bool) -> dict[bool, tuple]:
        """Per layer kind (True: global): its phase masks and the rotary angles of all rows
        and of the kept rows (original positions)."""
        cfg = self.config
        kept = None if routing is None else rows.gather(routing.kept)
        plan = {}
        for is_global in {cfg.is_global(i) for i in range(cfg.num_hidden_layers)}:
            inv = self.global_inv_freq if is_global else self.local_inv_freq
            window = None if is_global else cfg.local_attention // 2
            unmasked = is_global and not padded and rows.documents is None
            masks = (PhaseMasks(None, None, None) if unmasked
                     else phase_masks(rows, routing, window, flex=self.flex_attention))
            angles_all = rotary_angles(rows.positions, inv)
            angles_kept = None if kept is None else rotary_angles(kept.positions, inv)
            plan[is_global] = (masks, angles_all, angles_kept)
        return plan

    def forward(self, input_ids: torch.Tensor, real: torch.Tensor, padded: bool,
                documents: torch.Tensor | None = None, routing: Routing | None = None,
                split_layer: int | None = None) -> EncoderOutput:
        """`real` [b, T] bool (False at padding; `padded` says whether any is False),
        `documents` [b, T] document ids (None: attend across documents). With `routing`, the
        schedule of `BertEncoder.forward`; the final norm is applied to the last layer's output."""
        if routing is not None and routing.num_kept == routing.seq_length:
            routing = None  # keeping every token is the plain schedule, bit for bit
        x = self.embeddings(input_ids)
        plan = self._plan(all_rows(real, documents), routing, padded)
        last = len(self.layers) - 1
        penultimate, split_input = x, None
        for i, layer in enumerate(self.layers):
            masks, every, kept = plan[self.config.is_global(i)]
            if routing is None or i < split_layer:
                x = self._run(layer, x, masks.full, every, every)
            elif i == split_layer:
                split_input = x
                x = self._run(layer, x, masks.split, kept, every, routing.kept, routing.kept_local)
            elif i < last:
                x = self._run(layer, x, masks.kept, kept, kept)
            else:
                x = self._run(layer, scatter_tokens(split_input, routing.kept_local, x), masks.full, every, every)
            if i == last - 1:
                penultimate = x
        return EncoderOutput(hidden=self.final_norm(x), penultimate=penultimate)


class ModernBertPredictionHead(nn.Module):
    """dense (no bias), activation, norm: replicated, applied to the masked rows only."""

    def __init__(self, cfg: ModernBertModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.classifier_bias)
        nn.init.normal_(self.dense.weight, std=_out_std(cfg))
        self.act = _ACTIVATIONS[cfg.classifier_activation]
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class TiedDecoder(nn.Module):
    """The decoder tied to the (vocab-parallel) token embeddings, with its vocab-sharded bias;
    fused with the MLM cross-entropy like BERT's (`BertLMPredictionHead`)."""

    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        add_vocab_bias(self, cfg, ctx)

    def forward(self, h: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss [n] fp32, number correct) of replicated rows h [n, hidden]."""
        return tied_decode(self, h, weight, targets)


class ModernBertForMaskedLM(nn.Module):
    """ModernBERT with the MLM head; logits and cross-entropy only at masked positions.

    The same forward contract as `BertForMaskedLM` (token_type_ids are accepted and ignored:
    ModernBERT has no segment embeddings)."""

    def __init__(self, cfg: ModernBertModelConfig, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.config = cfg
        self.ctx = ctx
        self.model = ModernBertModel(cfg, ctx)
        self.head = ModernBertPredictionHead(cfg)
        self.decoder = TiedDecoder(cfg, ctx)
        tp.share_parameter(self.decoder, self.model.embeddings.tok_embeddings.weight)
        self.decoder.tied = self.model.embeddings.tok_embeddings.tied

    @property
    def encoder_layers(self) -> nn.ModuleList:
        """The layers `--compile` compiles one by one."""
        return self.model.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                token_type_ids: torch.Tensor | None = None, routing: Routing | None = None,
                split_layer: int | None = None, return_cls: bool = False,
                document_ids: torch.Tensor | None = None, padded: bool | torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None) -> MLMOutput:
        """input_ids/attention_mask/labels/document_ids: [b, s] (labels -100 where nothing is
        predicted; document_ids None: attention across documents). `labels` None: no MLM head.
        `padded` and `masked_positions` come with the loader's batches (no host sync); without
        them they are computed here, as in `bert.BertForMaskedLM`.

        `cls_penultimate` is the [CLS] row of layer L-2's output through a parameter-free
        LayerNorm: a pre-norm residual stream is not normalised, and its raw scale would make
        the softmax of the consistency KL arbitrarily sharp."""
        real = attention_mask.bool()
        # Without padding no mask: the unmasked (fused) kernels.
        padded = not bool(real.all()) if padded is None else bool(padded)
        with tp.sequence_parallel_grad_bucket(self.model, self.ctx):
            enc = self.model(input_ids, real, padded, document_ids, routing, split_layer)
        hidden = tp.leave_to_replicated(enc.hidden, self.ctx)
        out = (MLMOutput(None, None, None, None) if labels is None
               else self._mlm(hidden, labels, masked_positions))
        if return_cls:
            pen = tp.leave_to_replicated(enc.penultimate, self.ctx)[:, 0]
            out = out._replace(cls_final=hidden[:, 0],
                               cls_penultimate=F.layer_norm(pen, pen.shape[-1:], eps=self.config.norm_eps))
        return out

    def _mlm(self, hidden: torch.Tensor, labels: torch.Tensor,
             masked_positions: torch.Tensor | None) -> MLMOutput:
        weight = self.model.embeddings.tok_embeddings.weight
        return masked_lm(hidden, labels, masked_positions,
                         lambda h, targets: self.decoder(self.head(h), weight, targets))
