"""The encoder architectures (`--arch`): their config classes, model classes and transformers
counterparts, chosen in one place so the rest of the code never branches on the name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from sctd_dist.model.config import PRESETS, BertModelConfig
from sctd_dist.model.modernbert_config import MODERNBERT_PRESETS, ModernBertModelConfig

ARCHS = ("bert", "modernbert")
ModelConfig = Union[BertModelConfig, ModernBertModelConfig]
_CONFIGS: dict[str, Any] = {"bert": BertModelConfig, "modernbert": ModernBertModelConfig}
_PRESETS = {"bert": PRESETS, "modernbert": MODERNBERT_PRESETS}
# transformers' masked-LM class of each architecture, and the state-dict keys that are ties.
HF_CLASSES = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}
HF_TIED = {"bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                    "cls.predictions.decoder.bias": "cls.predictions.bias"},
           "modernbert": {"decoder.weight": "model.embeddings.tok_embeddings.weight"}}


def arch_of(cfg: ModelConfig) -> str:
    """`bert` or `modernbert`."""
    return getattr(cfg, "arch", "bert")


def attends_within_documents(arch: str) -> bool:
    """The `--attention-within-documents` default of an architecture: on for ModernBERT (its
    trainer never attends across documents), off for BERT (the 2018 recipe packs across them)."""
    return arch == "modernbert"


def preset_names(arch: str) -> list[str]:
    """The `--model` presets of an architecture."""
    return sorted(_PRESETS[arch])


def config_from_preset(arch: str, name: str, overrides: dict[str, Any] | str | Path | None = None,
                       **kwargs: Any) -> ModelConfig:
    """A preset of `arch` with overrides (see each config's `from_preset`)."""
    return _CONFIGS[arch].from_preset(name, overrides, **kwargs)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """The config a run record holds (`to_dict()`); records without `arch` are BERT's."""
    d = dict(d)
    arch = d.pop("arch", "bert")
    if arch not in _CONFIGS:
        raise ValueError(f"unknown model architecture {arch!r}; known: {list(ARCHS)}")
    return _CONFIGS[arch](**d)


def hf_model_type(folder: Path) -> str:
    """The architecture of a transformers model folder, from its config.json's model_type;
    another model type is refused in one line naming it."""
    path = Path(folder) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"--init-hf {folder}: cannot read {path}: {exc}") from None
    if model_type not in ARCHS:
        raise ValueError(f"--init-hf {folder} holds a {model_type!r} model; only {' and '.join(ARCHS)} "
                         "folders can be loaded")
    return model_type


def config_from_hf_folder(folder: Path, **kwargs: Any) -> ModelConfig:
    """Our config of the model in a transformers folder (architecture and shape from config.json)."""
    from transformers import AutoConfig

    arch = hf_model_type(folder)
    cfg = _CONFIGS[arch].from_hf_config(AutoConfig.from_pretrained(folder))
    return _CONFIGS[arch](**{**_fields(cfg), **kwargs})


def _fields(cfg: ModelConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    d.pop("arch", None)
    return d


def run_model_config(arch: str, preset: str, overrides: Path | None, init_hf: Path | None,
                     activation_checkpointing: bool, data_vocab_size: int, special=None) -> ModelConfig:
    """A training run's model config: from the --init-hf folder (architecture and shape), else
    the preset of `arch` with --model-config overrides. A preset takes the data's vocabulary
    size (and, for modernbert, its [PAD] [CLS] [SEP] ids); with --model-config or --init-hf the
    model keeps its own."""
    if init_hf is not None:
        return config_from_hf_folder(init_hf, activation_checkpointing=activation_checkpointing)
    extra: dict[str, Any] = {} if overrides is not None else {"vocab_size": data_vocab_size}
    if arch == "modernbert" and special is not None and overrides is None:
        extra.update(pad_token_id=special.pad, cls_token_id=special.cls, sep_token_id=special.sep)
    return config_from_preset(arch, preset, overrides, activation_checkpointing=activation_checkpointing,
                              **extra)


def build_mlm(cfg: ModelConfig, ctx):
    """The masked-LM model of `cfg`'s architecture."""
    if arch_of(cfg) == "modernbert":
        from sctd_dist.model.modernbert import ModernBertForMaskedLM

        return ModernBertForMaskedLM(cfg, ctx)
    from sctd_dist.model.bert import BertForMaskedLM

    return BertForMaskedLM(cfg, ctx)


def hf_class(cfg: ModelConfig):
    """transformers' masked-LM class for `cfg`."""
    import transformers

    return getattr(transformers, HF_CLASSES[arch_of(cfg)])
