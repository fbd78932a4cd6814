"""The ModernBERT encoder's configuration: typed, validated, with presets.

Field names are those of `transformers.ModernBertConfig`, so a JSON written for transformers
overrides a preset as it is. Layer i is global when `i % global_attn_every_n_layers == 0`; the
others attend within `local_attention` tokens (+-local_attention/2, in original positions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sctd_dist.model.config_common import EncoderConfigMixin, read_overrides
from sctd_dist.typed import check_types

MODERNBERT_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests and the demo; a window of 32 makes sliding layers matter at 128.
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=256,
                 local_attention=32),
    # transformers.ModernBertConfig's defaults (answerdotai/ModernBERT-base).
    "base": dict(num_hidden_layers=22, hidden_size=768, num_attention_heads=12, intermediate_size=1152),
    "large": dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, intermediate_size=2624),
}

# The biases released ModernBERT checkpoints use; other settings are refused (see validate).
_STOCK_BIASES = {"attention_bias": False, "mlp_bias": False, "norm_bias": False,
                 "classifier_bias": False, "decoder_bias": True}


@dataclass
class ModernBertModelConfig(EncoderConfigMixin):
    """Architecture of the ModernBERT encoder + MLM head (ModernBertForMaskedLM-compatible)."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    # Ours, not transformers': vocab padding granularity (times TP) and recomputation.
    make_vocab_size_divisible_by: int = 128
    activation_checkpointing: bool = False

    arch = "modernbert"  # a class attribute, not a field: which model class the config builds

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field to change."""
        check_types(self, prefix="--model-config field ")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "global_attn_every_n_layers",
                     "local_attention"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into num_attention_heads "
                             f"{self.num_attention_heads} heads of an even size (rotary embeddings)")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ("gelu", "gelu_new", "relu"):
                raise ValueError(f"{name} must be gelu, gelu_new or relu, got {getattr(self, name)!r}")
        for name in ("attention_dropout", "embedding_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name, stock in _STOCK_BIASES.items():
            if getattr(self, name) != stock:
                raise ValueError(f"{name}={getattr(self, name)} is not supported (every released "
                                 f"ModernBERT uses {name}={stock}); set it to {stock}")

    @property
    def attention_probs_dropout_prob(self) -> float:
        """The attention-probability dropout, under BERT's name (runtime reporting reads it)."""
        return self.attention_dropout

    def is_global(self, layer: int) -> bool:
        """Layer `layer` attends over the whole sequence (else within the sliding window)."""
        return layer % self.global_attn_every_n_layers == 0

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    def to_hf_config(self):
        """The equivalent `transformers.ModernBertConfig`."""
        from transformers import ModernBertConfig

        keys = {f.name for f in dataclasses.fields(self)} - {
            "make_vocab_size_divisible_by", "activation_checkpointing"}
        values = {k: getattr(self, k) for k in keys}
        values.update(bos_token_id=self.cls_token_id, eos_token_id=self.sep_token_id,
                      tie_word_embeddings=True)
        return ModernBertConfig(**values)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModernBertModelConfig":
        """Build from a `transformers.ModernBertConfig` (fields we do not use are ignored)."""
        return cls(**_from_hf_dict(hf_config.to_dict()))

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | str | Path | None = None,
                    **kwargs: Any) -> "ModernBertModelConfig":
        """A preset (`tiny`, `base`, `large`) with overrides from a dict or a JSON file."""
        if name not in MODERNBERT_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODERNBERT_PRESETS)}")
        values: dict[str, Any] = dict(MODERNBERT_PRESETS[name])
        values.update(_from_hf_dict(read_overrides(overrides, "ModernBertConfig"), strict=True))
        values.update(kwargs)
        return cls(**values)


def _from_hf_dict(d: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    """Our fields from a ModernBertConfig dict: `rope_parameters` and `layer_types` (how
    transformers 5 writes the thetas and the global/local pattern) become our scalar fields.
    `strict`: an unknown key is an error naming it (a --model-config typo)."""
    d = dict(d)
    d.pop("arch", None)
    rope = d.pop("rope_parameters", None) or {}
    for kind, name in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
        if isinstance(rope.get(kind), dict) and "rope_theta" in rope[kind]:
            d.setdefault(name, float(rope[kind]["rope_theta"]))
    types = d.pop("layer_types", None)
    if types:
        every = _global_every(types)
        if every is None:
            raise ValueError(f"layer_types {types} is not 'every n-th layer global, starting at 0'; "
                             "only that pattern is supported")
        d.setdefault("global_attn_every_n_layers", every)
    names = {f.name for f in dataclasses.fields(ModernBertModelConfig)}
    unknown = sorted(set(d) - names - _IGNORED_HF_KEYS)
    if strict and unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {sorted(names)}")
    return {k: v for k, v in d.items() if k in names}


def _global_every(types: list[str]) -> int | None:
    """n such that layer i is global exactly when i % n == 0, or None."""
    for n in range(1, len(types) + 1):
        if all((t == "full_attention") == (i % n == 0) for i, t in enumerate(types)):
            return n
    return None


# ModernBertConfig keys that carry no architecture information for us.
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "classifier_pooling", "classifier_dropout",
    "deterministic_flash_attn", "sparse_prediction", "sparse_pred_ignore_index", "reference_compile",
    "repad_logits_with_grad", "id2label", "label2id", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "is_encoder_decoder", "chunk_size_feed_forward",
    "gradient_checkpointing", "use_cache", "position_embedding_type",
}
