"""FLOP accounting of the token-dropping schedule and of ScTD's consistency steps."""

from __future__ import annotations

from sctd_dist.flops import encoder_forward_flops, sequence_forward_flops, step_flops_per_sequence
from sctd_dist.model.config import BertModelConfig, TokenDropConfig

CFG = BertModelConfig.from_preset("base")
SEQ, MASKED, KEPT = 128, 0.15 * 128, 64


def test_consistency_step_adds_a_full_encoder_pass_and_its_head_only_when_mixed():
    h, f, L = CFG.hidden_size, CFG.intermediate_size, CFG.num_hidden_layers
    plain = step_flops_per_sequence(CFG, TokenDropConfig(mode="vanilla"), SEQ, MASKED, 0, KEPT)
    full_encoder = 3 * encoder_forward_flops(L, SEQ, None, None, h, f)
    unmixed = step_flops_per_sequence(CFG, TokenDropConfig(mode="sctd"), SEQ, MASKED, 0, KEPT)
    mixed = step_flops_per_sequence(CFG, TokenDropConfig(mode="sctd", mlm_mix=0.5), SEQ, MASKED, 0, KEPT)
    assert unmixed == plain + full_encoder
    assert mixed == plain + 3 * sequence_forward_flops(CFG, SEQ, MASKED)
    # Off consistency steps ScTD costs what vanilla dropping costs.
    assert step_flops_per_sequence(CFG, TokenDropConfig(mode="sctd"), SEQ, MASKED, 1, KEPT) == plain


def test_peaks_of_the_nvl_parts():
    from sctd_dist.flops import peak_tflops

    assert peak_tflops("NVIDIA H200 NVL") == 835.0 and peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
