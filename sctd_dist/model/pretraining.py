"""The pretraining objective: MLM with token dropping, plus ScTD's consistency term.

`PretrainingModel` is what the DeepSpeed engine wraps. It owns the BERT, the token-importance
table and the router call, so one `forward(batch, step)` computes the whole loss of a
micro-batch. The model folds a step's masked-token losses into the importance table itself, in
the forward of the step's last micro-batch (it is told how many a step has), so no loop can
forget the update.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sctd_dist.model.arch import ModelConfig, build_mlm
from sctd_dist.model.bert import MLMOutput
from sctd_dist.model.config import TokenDropConfig
from sctd_dist.model.consistency import cls_cosine, consistency_term
from sctd_dist.model.importance import TokenImportance
from sctd_dist.model.router import Routing, num_kept, route
from sctd_dist.parallel.state import ParallelContext
from sctd_dist.documents import document_ids
from sctd_dist.special_tokens import SpecialTokenIds


def check_layout(model_config: ModelConfig, drop: TokenDropConfig, seq_length: int,
                 tp_size: int, sequence_parallel: bool) -> None:
    """Raise ValueError when this model cannot train on sequences of `seq_length` at this
    tensor/sequence-parallel layout (all known from the flags: checked before any process group)."""
    model_config.check_tensor_parallel(tp_size)
    model_config.check_seq_length(seq_length)
    if drop.enabled:
        num_kept(seq_length, drop.keep_ratio, tp_size, sequence_parallel)


class StepOutput(NamedTuple):
    """The loss to backpropagate and detached numbers for the metrics (a NamedTuple, like every
    module output: see `MLMOutput`)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class PretrainingModel(nn.Module):
    """BERT MLM pretraining under the `none`, `vanilla` and `sctd` token-dropping modes."""

    def __init__(
        self,
        model_config: ModelConfig,
        drop_config: TokenDropConfig,
        special: SpecialTokenIds,
        ctx: ParallelContext | None = None,
        within_documents: bool = False,
        micro_batches_per_step: int = 1,
    ) -> None:
        """`within_documents`: a token attends only to tokens of its own document (the
        batch's `document_ids`, else derived from its [SEP] tokens)."""
        super().__init__()
        if micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step must be >= 1, got {micro_batches_per_step}")
        # Training forwards per optimizer step (gradient accumulation): the last one of each
        # folds the step's losses into the importance table.
        self.micro_batches_per_step = micro_batches_per_step
        ctx = ctx or ParallelContext()
        self.ctx = ctx
        self.drop = drop_config
        self.special = special
        self.mlm = build_mlm(model_config, ctx)
        self.within_documents = within_documents
        self.split_layer = (drop_config.resolve_split_layer(model_config.num_hidden_layers)
                            if drop_config.enabled else None)
        self.importance = TokenImportance(
            # The router always keeps [CLS] [SEP] [MASK] [UNK] and drops [PAD] first.
            model_config.vocab_size, high_ids=(special.cls, special.sep, special.mask, special.unk),
            pad_id=special.pad,
            init_value=drop_config.importance_init, beta=drop_config.importance_beta,
            dp_group=ctx.dp_group if ctx.dp_size > 1 else None,
        )
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._forwards = 0  # training forwards of the current optimizer step so far

    def routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Routing:
        """Kept positions for this batch; identical on every TP rank (same ids, same table)."""
        return route(input_ids, attention_mask, self.importance, self.drop.keep_ratio,
                     tp_size=self.ctx.tp_size, tp_rank=self.ctx.tp_rank,
                     sequence_parallel=self.ctx.sequence_parallel)

    def _pass(self, batch: dict[str, torch.Tensor], routing: Routing | None, want_cls: bool,
              mlm_head: bool = True) -> MLMOutput:
        return self.mlm(batch["input_ids"], batch["attention_mask"],
                        batch["labels"] if mlm_head else None, batch.get("token_type_ids"),
                        routing=routing, split_layer=self.split_layer, return_cls=want_cls,
                        padded=batch.get("padded"), masked_positions=batch.get("masked_positions"),
                        document_ids=self._documents(batch))

    def _documents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.within_documents:
            return None
        docs = batch.get("document_ids")
        return document_ids(batch["input_ids"], self.special.sep) if docs is None else docs

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> StepOutput:
        """Loss of one micro-batch at optimizer step `step` (training mode); the step's last
        micro-batch also updates the importance table (`_fold_importance`).

        Off consistency steps: the (token-dropping) MLM loss, a mean over masked tokens. On
        consistency steps (SPEC 2.2), with a = --sctd-mlm-mix and w = --sctd-weight:
            loss = (1 - a) * MLM_drop + a * MLM_full + w * sum_b (KL_local_b + KL_global_b) / n_masked
        The full pass runs its MLM head only when a > 0."""
        out = self._loss(batch, step)
        if self.training:
            self._forwards += 1
            if self._forwards == self.micro_batches_per_step:
                self._forwards = 0
                self._fold_importance()
        return out

    def _loss(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        if not self.drop.enabled:
            out = self._pass(batch, None, False)
            return StepOutput(out.loss, self._metrics(out, out.loss))
        routing = self.routing(batch["input_ids"], batch["attention_mask"])
        consistency_step = self.drop.is_sctd_step(step)
        out = self._pass(batch, routing, consistency_step)
        if self.training:
            self._pending.append((out.targets.detach(), out.per_token_loss.detach()))
        if not consistency_step:
            return StepOutput(out.loss, self._metrics(out, out.loss))
        mix = self.drop.mlm_mix
        full = self._pass(batch, None, True, mlm_head=mix > 0)
        term = consistency_term(full.cls_penultimate, full.cls_final, out.cls_penultimate,
                                out.cls_final, self.drop.sctd_weight, out.targets.numel())
        mlm = out.loss if mix == 0 else (1 - mix) * out.loss + mix * full.loss
        loss = mlm + term.loss
        extra = {"consistency_loss": term.loss.detach(),
                 "kl_local": term.kl_local.detach().mean(), "kl_global": term.kl_global.detach().mean()}
        if mix > 0:
            extra["full_mlm_loss"] = full.loss.detach()
        return StepOutput(loss, {**self._metrics(out, loss), **extra})

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Validation loss and accuracy always use all tokens. With token dropping on, it also
        runs the dropping path on the same batch and reports `eval_cls_cosine`, the cosine
        between the two final [CLS] vectors (how far dropping moves the sequence meaning), and
        `eval_cls_cosine_centered` (see `cls_cosine`)."""
        out = self._pass(batch, None, self.drop.enabled)
        n = out.targets.numel()
        # Rows with nothing to predict are a loader's filler slots: no part of the averages.
        real = (batch["labels"] >= 0).any(dim=1)
        result = {"eval_loss": out.loss.item(), "eval_acc": float(out.num_correct) / max(n, 1),
                  "eval_tokens": float(n), "eval_sequences": float(real.sum())}
        if self.drop.enabled and bool(real.any()):
            dropped = self._pass(batch, self.routing(batch["input_ids"], batch["attention_mask"]), True)
            full_cls, drop_cls = out.cls_final[real], dropped.cls_final[real]
            result["eval_cls_cosine"] = cls_cosine(full_cls, drop_cls).item()
            result["eval_cls_cosine_centered"] = cls_cosine(full_cls, drop_cls, centered=True).item()
        return result

    def compile_layers(self) -> int:
        """`torch.compile` each encoder layer in place (see `sctd_dist.parallel.kernels`)."""
        from sctd_dist.parallel.kernels import compile_each

        return compile_each(self.mlm.encoder_layers)

    def _fold_importance(self) -> None:
        """Fold this optimizer step's masked-token losses into the importance table (every DP
        rank at the same step: the table's update is an all-reduce). The routing of the step's
        micro-batches was computed before: the table moves for the next step, as after it."""
        if not self.drop.enabled:
            self._pending.clear()
            return
        device = self.importance.scores.device
        if self._pending:
            targets = torch.cat([t for t, _ in self._pending]).to(device)
            losses = torch.cat([l for _, l in self._pending]).to(device)
        else:  # still join the DP all-reduce
            targets = torch.zeros(0, dtype=torch.long, device=device)
            losses = torch.zeros(0, device=device)
        self._pending.clear()
        self.importance.update(targets, losses.float())

    @staticmethod
    def _metrics(out: MLMOutput, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        # Detached tensors, not floats: no host sync per micro-batch; the loop converts once.
        n = max(out.targets.numel(), 1)
        return {"loss": loss.detach(), "mlm_loss": out.loss.detach(),
                "mlm_acc": out.num_correct.detach() / n}
