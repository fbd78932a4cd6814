"""Model and token-dropping configuration: typed, validated, with the paper's defaults.

Field names of `BertModelConfig` are those of `transformers.BertConfig`, so a JSON written for
Hugging Face can override a preset as it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sctd_dist.flags import flag
from sctd_dist.model.config_common import EncoderConfigMixin, read_overrides
from sctd_dist.typed import check_types

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests and the demo.
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class BertModelConfig(EncoderConfigMixin):
    """Architecture of the BERT encoder + MLM head (BertForMaskedLM-compatible)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Ours, not Hugging Face's: vocab padding granularity (times TP) and recomputation.
    make_vocab_size_divisible_by: int = 128
    activation_checkpointing: bool = False

    arch = "bert"  # a class attribute, not a field (run records without it are BERT's)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field to change."""
        check_types(self, prefix="--model-config field ")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; choose heads dividing the hidden size"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"hidden_act must be gelu, gelu_new or relu, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_config(self):
        """The equivalent `transformers.BertConfig`."""
        from transformers import BertConfig

        keys = {f.name for f in dataclasses.fields(self)} - {
            "make_vocab_size_divisible_by", "activation_checkpointing"}
        return BertConfig(**{k: getattr(self, k) for k in keys})

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "BertModelConfig":
        """Build from a `transformers.BertConfig` (unknown HF fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf_config.to_dict().items() if k in names})

    @classmethod
    def from_preset(
        cls, name: str, overrides: dict[str, Any] | str | Path | None = None, **kwargs: Any
    ) -> "BertModelConfig":
        """A preset (`tiny`, `base`, `large`) with overrides from a dict or a JSON file."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        values: dict[str, Any] = dict(PRESETS[name])
        values.update(read_overrides(overrides, "BertConfig"))
        values.update(kwargs)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - _IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(
                f"unknown model config field(s) {unknown}; valid fields: {sorted(names)}"
            )
        return cls(**{k: v for k, v in values.items() if k in names})


# Hugging Face config.json keys that carry no architecture information for us.
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "position_embedding_type", "use_cache", "classifier_dropout", "gradient_checkpointing",
    "is_decoder", "add_cross_attention", "tie_word_embeddings", "_name_or_path",
}

TokenDropMode = Literal["none", "vanilla", "sctd"]


@dataclass
class TokenDropConfig:
    """Token dropping (Hou et al. 2022) and ScTD (Zhong et al. 2023) settings; paper defaults.

    Each field with a help text is also a flag of `sctd_dist.train` (the "token dropping" group).
    """

    mode: TokenDropMode = flag("sctd", "plain MLM (none), token dropping (vanilla) or ScTD (sctd)",
                               name="--token-drop")
    keep_ratio: float = flag(0.5, "fraction of tokens through the middle layers", name="--token-keep-ratio")
    split_layer: int | None = flag(None, "index of the split layer (default: num_layers/2 - 1)",
                                   name="--token-drop-split-layer")
    sctd_interval: int = flag(10, "consistency step every N optimizer steps, step 0 included")
    sctd_weight: float = flag(0.05, "weight w of the consistency term (averaged per masked token like "
                              "the MLM loss)")
    # On consistency steps the MLM part is (1 - mix) * MLM_drop + mix * MLM_full. 0 is what the
    # released code effectively optimises (the full pass then runs no MLM head); 0.5 is what it
    # was written to do.
    mlm_mix: float = flag(0.0, "on consistency steps the MLM loss is (1-ALPHA)*MLM_drop + "
                          "ALPHA*MLM_full; 0 is the released code's effective objective, 0.5 what "
                          "it was written to do", name="--sctd-mlm-mix", metavar="ALPHA")
    importance_beta: float = flag(0.95, "EMA factor of the token-importance table")
    importance_init: float = 10.0

    def __post_init__(self) -> None:
        check_types(self)
        if self.mode not in ("none", "vanilla", "sctd"):
            raise ValueError(f"--token-drop must be none, vanilla or sctd, got {self.mode!r}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"--token-keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.sctd_interval < 1:
            raise ValueError(f"--sctd-interval must be >= 1, got {self.sctd_interval}")
        if not (math.isfinite(self.sctd_weight) and self.sctd_weight >= 0):
            raise ValueError(f"--sctd-weight must be a finite number >= 0, got {self.sctd_weight}")
        if not 0.0 <= self.mlm_mix <= 1.0:  # also refuses NaN
            raise ValueError(f"--sctd-mlm-mix must be in [0, 1], got {self.mlm_mix}")
        if not 0.0 <= self.importance_beta < 1.0:
            raise ValueError(f"--importance-beta must be in [0, 1), got {self.importance_beta}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def resolve_split_layer(self, num_layers: int) -> int:
        """The split layer for an encoder of `num_layers`, validated."""
        if num_layers < 4:
            raise ValueError(
                f"token dropping needs at least 4 layers (full, split, kept-only, last), the "
                f"model has {num_layers}; use --token-drop none or a deeper model"
            )
        split = num_layers // 2 - 1 if self.split_layer is None else self.split_layer
        if not 0 <= split <= num_layers - 2:
            raise ValueError(
                f"split layer {split} out of range for {num_layers} layers; "
                f"choose 0..{num_layers - 2} (the last layer always sees all tokens)"
            )
        return split

    def is_sctd_step(self, step: int) -> bool:
        """ScTD consistency steps: every `sctd_interval`-th optimizer step, step 0 included."""
        return self.mode == "sctd" and step % self.sctd_interval == 0
