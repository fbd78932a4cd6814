"""Configuration errors say what to change; presets and HF configs map onto each other."""

from __future__ import annotations

import json

import pytest

from sctd_dist.model.config import BertModelConfig, TokenDropConfig
from sctd_dist.parallel import check_tp_size


def test_presets_have_the_published_shapes():
    base = BertModelConfig.from_preset("base")
    large = BertModelConfig.from_preset("large")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert large.intermediate_size == 4096


def test_json_overrides_use_transformers_field_names(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4,
                                "model_type": "bert"}))
    cfg = BertModelConfig.from_preset("base", path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 256, 3072)
    assert BertModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="num_layers"):
        BertModelConfig.from_preset("tiny", num_layers=3)


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        BertModelConfig.from_preset("tiny", hidden_size=100, num_attention_heads=3)


def test_heads_not_divisible_by_tp():
    cfg = BertModelConfig.from_preset("base")
    with pytest.raises(ValueError, match="num_attention_heads 12 is not divisible by --tensor-model-parallel-size 8"):
        cfg.check_tensor_parallel(8)
    cfg.check_tensor_parallel(4)


def test_sequence_longer_than_positions():
    cfg = BertModelConfig.from_preset("tiny", max_position_embeddings=128)
    with pytest.raises(ValueError, match="sequence length 256 exceeds max_position_embeddings 128"):
        cfg.check_seq_length(256)


def test_tp_size_not_dividing_world():
    with pytest.raises(ValueError, match=r"does not divide the world size 6.*\[1, 2, 3, 6\]"):
        check_tp_size(4, 6)
    check_tp_size(3, 6)


def test_vocab_padding():
    cfg = BertModelConfig.from_preset("base")
    assert cfg.padded_vocab_size(1) == 30592
    assert cfg.padded_vocab_size(8) % (128 * 8) == 0 and cfg.padded_vocab_size(8) >= 30522


def test_token_drop_validation():
    with pytest.raises(ValueError, match="keep-ratio"):
        TokenDropConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="keep-ratio"):
        TokenDropConfig(keep_ratio=1.2)
    for ratio in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep-ratio"):
            TokenDropConfig(keep_ratio=ratio)
    for beta in (1.0, -0.1, float("nan")):  # the importance table's EMA factor
        with pytest.raises(ValueError, match="--importance-beta must be"):
            TokenDropConfig(importance_beta=beta)
    with pytest.raises(ValueError, match="at least 4 layers"):
        TokenDropConfig().resolve_split_layer(3)
    with pytest.raises(ValueError, match="split layer 11 out of range for 12 layers"):
        TokenDropConfig(split_layer=11).resolve_split_layer(12)
    assert TokenDropConfig().resolve_split_layer(12) == 5
    assert TokenDropConfig().resolve_split_layer(24) == 11
    assert [s for s in range(25) if TokenDropConfig().is_sctd_step(s)] == [0, 10, 20]
