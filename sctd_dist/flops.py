"""Model FLOPs of a training step, following the token-dropping layer schedule.

Counts matrix multiplications only (2 FLOPs per multiply-add; backward = 2x forward), which is
the convention behind published model-FLOPs-utilisation numbers.
"""

from __future__ import annotations

from sctd_dist.model.config import BertModelConfig, TokenDropConfig

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU column; unknown devices get no MFU. The
# first name contained in the device's name wins: the PCIe and NVL H100s before the SXM one
# ("NVIDIA H100 80GB HBM3"), the H200 NVL before the SXM one; "H200" also matches the GH200.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def layer_forward_flops(queries: int, keys: int, h: int, f: int) -> float:
    """One encoder layer's forward for one sequence, `queries` rows attending over `keys` rows:
        Q projection + attention-output projection on the query rows   2*q*h*h * 2
        K and V projections on the key rows                             2*kv*h*h * 2
        scores Q K^T and the probability-weighted sum of V              2*q*kv*h * 2
        FFN (h -> f -> h) on the query rows                             2*q*h*f * 2
    Full layer: q = kv = T. Split layer: q = k kept, kv = T. Kept-only layer: q = kv = k."""
    return float(2 * queries * h * h * 2 + 2 * keys * h * h * 2 + 2 * queries * keys * h * 2
                 + 2 * queries * h * f * 2)


def encoder_forward_flops(num_layers: int, seq: int, kept: int | None, split_layer: int | None,
                          h: int, f: int) -> float:
    """The schedule of SPEC 2.1 (`kept` None: every layer on all `seq` tokens)."""
    total = 0.0
    for i in range(num_layers):
        if kept is None or i < split_layer or i == num_layers - 1:
            total += layer_forward_flops(seq, seq, h, f)
        elif i == split_layer:
            total += layer_forward_flops(kept, seq, h, f)
        else:
            total += layer_forward_flops(kept, kept, h, f)
    return total


def sequence_forward_flops(cfg: BertModelConfig, seq: int, masked: float,
                           kept: int | None = None, split_layer: int | None = None) -> float:
    """Forward FLOPs for one sequence of `seq` tokens with `masked` predicted positions."""
    h = cfg.hidden_size
    # A GLU's input projection is twice as wide: its FFN costs 3 h x f GEMMs, BERT's 2.
    ffn = cfg.intermediate_size * (3 if getattr(cfg, "arch", "bert") == "modernbert" else 2) // 2
    total = encoder_forward_flops(cfg.num_hidden_layers, seq, kept, split_layer, h, ffn)
    return total + 2 * masked * (h * h + h * cfg.vocab_size)  # MLM head at masked positions only


def step_flops_per_sequence(cfg: BertModelConfig, drop: TokenDropConfig, seq: int, masked: float,
                            step: int, kept: int | None) -> float:
    """Training FLOPs (forward + backward) per sequence at optimizer step `step`."""
    if not drop.enabled:
        return 3 * sequence_forward_flops(cfg, seq, masked)
    split = drop.resolve_split_layer(cfg.num_hidden_layers)
    flops = 3 * sequence_forward_flops(cfg, seq, masked, kept, split)
    if drop.is_sctd_step(step):
        # The full-token pass; its MLM head runs only when its loss is mixed in.
        flops += 3 * sequence_forward_flops(cfg, seq, masked if drop.mlm_mix > 0 else 0.0)
    return flops


def step_flops(cfg: BertModelConfig, drop: TokenDropConfig, seq: int, masked: float, sequences: int,
               step: int) -> float:
    """Training FLOPs of optimizer step `step` (0-based) over `sequences` sequences of `seq`
    tokens with `masked` predicted positions each, keeping as many tokens as the router does."""
    from sctd_dist.model.router import num_kept

    kept = num_kept(seq, drop.keep_ratio) if drop.enabled else None
    return sequences * step_flops_per_sequence(cfg, drop, seq, masked, step, kept)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU, matched by name; None when unknown (e.g. CPUs)."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
