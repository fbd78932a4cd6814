"""BERT for masked-LM pretraining, tensor parallel, with the token-dropping layer schedule.

Post-LayerNorm layers like Hugging Face's BertForMaskedLM, and the same module names, so a
state dict maps 1:1 (see `sctd_dist.hf`). Activations are [batch, seq, hidden]; under sequence
parallelism each TP rank holds a contiguous sequence slice between layers. All communication
goes through `sctd_dist.parallel.layers`; this file is model math.
"""

from __future__ import annotations

from typing import Callable, NamedTuple
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sctd_dist.model.attention_masks import PhaseMasks, all_rows, phase_masks
from sctd_dist.model.config import BertModelConfig
from sctd_dist.model.decoder import add_vocab_bias, tied_decode
from sctd_dist.model.router import Routing, gather_tokens, scatter_tokens
from sctd_dist.parallel import layers as tp
from sctd_dist.parallel.random import checkpoint_context_fn
from sctd_dist.parallel.state import ParallelContext

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.word_embeddings = tp.vocab_parallel_embedding(
            cfg.padded_vocab_size(ctx.tp_size), cfg.hidden_size, ctx, cfg.initializer_range,
            real_rows=cfg.vocab_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        for emb in (self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=cfg.initializer_range)
        self.LayerNorm = tp.ParallelLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.dropout = tp.ParallelDropout(cfg.hidden_dropout_prob, ctx)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(tp.split_to_sequence(x, self.ctx)))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        h, std = cfg.hidden_size, cfg.initializer_range
        self.query = tp.column_parallel_linear(h, h, ctx, std)
        self.key = tp.column_parallel_linear(h, h, ctx, std)
        self.value = tp.column_parallel_linear(h, h, ctx, std)
        self.heads = cfg.num_attention_heads // ctx.tp_size
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Queries from `q_in` rows, keys/values from `kv_in` rows; returns [b, sq, h/tp].
        `key_mask` None means every key is real (packed batches), which lets SDPA pick its
        fused kernels (FlashAttention on GPUs takes no mask)."""
        q = self._heads(self.query(q_in)[0])
        k = self._heads(self.key(kv_in)[0])
        v = self._heads(self.value(kv_in)[0])
        # A [b, sk] key mask, or a [b, 1, sq, sk] mask (attention within documents).
        mask = key_mask if key_mask is None or key_mask.dim() == 4 else key_mask[:, None, None, :]
        out = tp.attention(q, k, v, mask, self.dropout_p if self.training else 0.0, self.ctx)
        b, _, sq, _ = out.shape
        return out.transpose(1, 2).reshape(b, sq, self.heads * self.head_dim)


class BertSelfOutput(nn.Module):
    """Row-parallel projection, dropout, residual and LayerNorm (HF's BertSelfOutput/BertOutput)."""

    def __init__(self, in_features: int, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.dense = tp.row_parallel_linear(in_features, cfg.hidden_size, ctx, cfg.initializer_range)
        self.LayerNorm = tp.ParallelLayerNorm(cfg.hidden_size, cfg.layer_norm_eps, ctx)
        self.dropout = tp.ParallelDropout(cfg.hidden_dropout_prob, ctx)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(tp.row_parallel_forward(self.dense, x, self.ctx)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg, ctx)
        self.output = BertSelfOutput(cfg.hidden_size, cfg, ctx)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.dense = tp.column_parallel_linear(
            cfg.hidden_size, cfg.intermediate_size, ctx, cfg.initializer_range)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x)[0])


class BertLayer(nn.Module):
    """One post-LN encoder layer. With `query_index` it is the token-dropping split layer:
    queries (and the output) only at the kept rows, keys/values over all rows."""

    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.attention = BertAttention(cfg, ctx)
        self.intermediate = BertIntermediate(cfg, ctx)
        self.output = BertSelfOutput(cfg.intermediate_size, cfg, ctx)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        query_index: torch.Tensor | None = None,
        query_index_local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: this rank's rows [b, s_local, h]; key_mask: [b, s_full] bool over all keys (None:
        no padding).

        query_index / query_index_local: kept positions in the full sequence / in this rank's
        slice (equal without SP). Returns the layer output at the query rows of this rank.
        """
        full = tp.enter_tp_region(x, self.ctx)
        if query_index is None:
            q_in, residual = full, x
        else:
            q_in, residual = gather_tokens(full, query_index), gather_tokens(x, query_index_local)
        attn = self.attention.self(q_in, full, key_mask)
        a = self.attention.output(attn, residual)
        inter = self.intermediate(tp.enter_tp_region(a, self.ctx))
        return self.output(inter, a)


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # final layer, this rank's rows [b, s_local, h]
    penultimate: torch.Tensor  # output of layer L-2 (kept rows when dropping)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, ctx) for _ in range(cfg.num_hidden_layers))
        self.activation_checkpointing = cfg.activation_checkpointing

    def _run(self, layer: BertLayer, *args: torch.Tensor | None) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, context_fn=checkpoint_context_fn)
        return layer(*args)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        routing: Routing | None = None,
        split_layer: int | None = None,
        masks: PhaseMasks | None = None,
    ) -> EncoderOutput:
        """Run all layers; with `routing`, the token-dropping schedule around `split_layer`:
        full layers, the split layer (kept queries, all keys), kept-only layers, merge of the
        dropped rows (which keep their split-layer input), and the last layer on all tokens.
        `masks` (attention within documents) replaces the key masks of every phase."""
        if routing is not None and routing.num_kept == routing.seq_length:
            routing = None  # keeping every token is the plain schedule, bit for bit
        # Without padding every kept key is real too: no mask anywhere.
        mask_all = None if key_mask is None or routing is None else routing.key_mask_all
        mask_kept = None if key_mask is None or routing is None else routing.key_mask_kept
        if masks is not None:
            key_mask, mask_all, mask_kept = masks
        last = len(self.layer) - 1
        penultimate = x
        split_input = None
        for i, layer in enumerate(self.layer):
            if routing is None or i < split_layer:
                x = self._run(layer, x, key_mask)
            elif i == split_layer:
                split_input = x
                x = self._run(layer, x, mask_all, routing.kept, routing.kept_local)
            elif i < last:
                x = self._run(layer, x, mask_kept)
            else:
                x = self._run(layer, scatter_tokens(split_input, routing.kept_local, x), key_mask)
            if i == last - 1:
                penultimate = x
        return EncoderOutput(hidden=x, penultimate=penultimate)


class BertModel(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg, ctx)
        self.encoder = BertEncoder(cfg, ctx)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        nn.init.normal_(self.dense.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.dense.bias)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Transform + decoder tied to the (vocab-parallel) word embeddings + vocab-sharded bias,
    with the MLM cross-entropy fused into the decoder (no [n, V] logits outlive the forward)."""

    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.transform = BertPredictionHeadTransform(cfg)
        add_vocab_bias(self, cfg, ctx)

    def forward(self, h: torch.Tensor, decoder_weight: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss [n] in fp32, number of rows whose target has the largest logit) of
        replicated hidden states h [n, hidden] against global target ids [n]."""
        return tied_decode(self, self.transform(h), decoder_weight, targets)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, ctx)


class MLMOutput(NamedTuple):
    """What one forward pass produces for the objective and the metrics.

    Module outputs are NamedTuples, not dataclasses: ZeRO-3 finds the tensors of a module's
    output to hook its backward, and it looks inside tuples, lists and dicts only."""

    # The MLM fields are None when the forward ran without labels (no MLM head).
    loss: torch.Tensor | None  # mean MLM loss over this replica's masked positions
    per_token_loss: torch.Tensor | None  # [n_masked], inputs for the importance update
    targets: torch.Tensor | None  # [n_masked] target ids
    num_correct: torch.Tensor | None  # scalar, rows whose target has the largest logit (over all shards)
    cls_penultimate: torch.Tensor | None = None  # [b, h] [CLS] at the output of layer L-2
    cls_final: torch.Tensor | None = None  # [b, h] [CLS] at the final layer


class BertForMaskedLM(nn.Module):
    """BERT with the MLM head; logits and cross-entropy only at masked positions."""

    def __init__(self, cfg: BertModelConfig, ctx: ParallelContext | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.config = cfg
        self.ctx = ctx
        self.bert = BertModel(cfg, ctx)
        self.cls = BertOnlyMLMHead(cfg, ctx)
        tp.share_parameter(self.cls.predictions, self.bert.embeddings.word_embeddings.weight)
        self.cls.predictions.tied = self.bert.embeddings.word_embeddings.tied

    @property
    def encoder_layers(self) -> nn.ModuleList:
        """The layers `--compile` compiles one by one."""
        return self.bert.encoder.layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        routing: Routing | None = None,
        split_layer: int | None = None,
        return_cls: bool = False,
        padded: bool | torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> MLMOutput:
        """input_ids/attention_mask/labels: [b, s] (labels -100 where nothing is predicted).

        `labels` None runs the encoder only: no MLM head, no logits (a consistency pass needs
        just the [CLS] vectors). `padded` (does any row hold padding?) and `masked_positions`
        (flat indices of the labelled positions) come with the loader's batches, which lets the
        step run without a host sync; without them they are computed here (one sync each).
        `document_ids` [b, s]: attend only within each document."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if padded is None:
            padded = not bool(attention_mask.all())
        # No mask without padding: the fused (FlashAttention) kernels take none.
        key_mask = attention_mask.bool() if bool(padded) else None
        masks = None
        if document_ids is not None:
            r = routing if routing is None or routing.num_kept < routing.seq_length else None
            masks = phase_masks(all_rows(attention_mask.bool(), document_ids), r)
        with tp.sequence_parallel_grad_bucket(self.bert, self.ctx):
            x = self.bert.embeddings(input_ids, token_type_ids)
            enc = self.bert.encoder(x, key_mask, routing, split_layer, masks)
        hidden = tp.leave_to_replicated(enc.hidden, self.ctx)
        out = (MLMOutput(None, None, None, None) if labels is None
               else self._mlm(hidden, labels, masked_positions))
        if return_cls:
            out = out._replace(
                cls_final=hidden[:, 0],
                cls_penultimate=tp.leave_to_replicated(enc.penultimate, self.ctx)[:, 0])
        return out

    def _mlm(self, hidden: torch.Tensor, labels: torch.Tensor,
             masked_positions: torch.Tensor | None) -> MLMOutput:
        weight = self.bert.embeddings.word_embeddings.weight
        return masked_lm(hidden, labels, masked_positions,
                         lambda h, targets: self.cls.predictions(h, weight, targets))


def masked_lm(hidden: torch.Tensor, labels: torch.Tensor, masked_positions: torch.Tensor | None,
              predict: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
              ) -> MLMOutput:
    """The MLM loss of the labelled rows of `hidden` [b, s, h]: `predict(rows, targets)` gives
    (per-token loss, number correct). `masked_positions` (flat indices of the labelled
    positions) comes with the loader's batches; without it, it is found here (a host sync)."""
    flat = labels.reshape(-1)
    if masked_positions is None:  # a data-dependent size: a host sync
        masked_positions = torch.nonzero(flat >= 0).squeeze(1)
    targets = flat.index_select(0, masked_positions)
    per_token, num_correct = predict(hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions),
                                     targets)
    # With nothing to predict the loss is an exact zero that still reaches every weight.
    loss = per_token.mean() if targets.numel() else per_token.sum()
    return MLMOutput(loss=loss, per_token_loss=per_token, targets=targets, num_correct=num_correct)
