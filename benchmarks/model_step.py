"""Forward+backward step time of our TP=1 BertForMaskedLM against transformers.BertForMaskedLM.

Same config, same weights (`sctd_dist.hf.load_hf_state_dict`), same batch, side by side: the
arms run round-robin in one loop (order rotated per repeat) and the median of the repeats is
reported. One "step" = zero_grad(set_to_none) + forward (loss) + backward, in train mode
(dropout as configured, default 0.1 like BERT pretraining).

Arms
  ours         our model; logits and cross-entropy only at the masked (15%) positions
  hf           transformers.BertForMaskedLM; logits at every position (its design)
  ours_allpos  our model with a label at *every* position, i.e. the same MLM-head work as HF:
               isolates the encoder/implementation difference from the "head only at masked
               positions" saving (disable with --no-allpos)
  ours_compiled, ours_allpos_compiled (--compile)  the same on a copy of our model whose encoder
               layers are compiled as `train.py --compile` compiles them

ratio = median(ours) / median(hf); goal: <= 1.0. Equal work: median(ours_allpos) / median(hf);
goal (fp32): <= 0.85. A correctness column compares the loss (and the gradients) of ours vs HF
on the same batch in eval mode (no dropout): fp32 should agree to ~1e-5.

GEMM share (CPU): one profiled step per arm splits its time into matrix multiplications (aten
mm/addmm/bmm) and everything else. HF's share is the floor of the equal-work ratio for any
implementation that runs HF's GEMMs at HF's GEMM speed and spends nothing on anything else; our
GEMM-only efficiency is the CPU efficiency our step would have with free non-GEMM work.

CPU efficiency: each arm's model FLOP/s (matmul FLOPs as `sctd_dist.flops` counts them, for the
positions that arm predicts) over the FLOP/s of the model's own FFN GEMM ([tokens, h] x [h, 4h],
`gemm` arm) timed in the same interleaved loop; goal at base width, fp32, our step: >= 0.8.

    python benchmarks/model_step.py --quick          # smoke run (~1 min on 2 CPU cores)
    python benchmarks/model_step.py                  # full CPU run -> results/model_step.json
    python benchmarks/model_step.py --device cuda --batch-mult 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

# name -> (layers, hidden, heads, intermediate). "base-w" is BERT-base width with fewer layers
# (CPU budget); the per-layer and head costs are those of BERT-base.
MODELS = {
    "tiny": (4, 128, 2, 512),
    "base-w": (2, 768, 12, 3072),
}

# (model, seq, dtype) -> batch size giving a 0.1-2 s step on 1-2 AVX-512 CPU cores.
DEFAULT_BATCH = {
    ("tiny", 128, "fp32"): 16, ("tiny", 512, "fp32"): 4,
    ("base-w", 128, "fp32"): 4, ("base-w", 512, "fp32"): 1,
    # bf16: on CPUs with avx512_bf16 a bf16 step is as fast as or faster than fp32 (SPEC 4
    # measured 17-24x slower on AVX2-only CPUs: use --batch 1 --bf16-repeats 1 there).
    ("tiny", 128, "bf16"): 16, ("tiny", 512, "bf16"): 4,
    ("base-w", 128, "bf16"): 4, ("base-w", 512, "bf16"): 1,
}
QUICK_BATCH = {k: max(1, v // 4) for k, v in DEFAULT_BATCH.items()}
GEMM_REPEATS = 4  # FFN GEMMs per timed `gemm` call: a timed region of a few tens of ms
GOAL_EQUAL_WORK = 0.85  # ours_allpos / hf, fp32
GOAL_CPU_EFFICIENCY = 0.8  # our step's model FLOP/s over the GEMM's, base width, fp32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--models", default="tiny,base-w", help="comma list of " + ",".join(MODELS))
    p.add_argument("--base-layers", type=int, default=MODELS["base-w"][0],
                   help="layers of the base-width model (default 2 on CPU; 12 = BERT-base)")
    p.add_argument("--seqs", default="128,512")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--bf16-mode", choices=("cast", "autocast"), default="cast",
                   help="cast: model.to(bfloat16) (what DeepSpeed bf16 does); autocast: fp32 "
                        "weights under torch.autocast (both arms alike)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every case")
    p.add_argument("--batch-mult", type=int, default=1, help="multiply the default batch sizes (GPUs)")
    p.add_argument("--mask-frac", type=float, default=0.15)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--dropout", type=float, default=None,
                   help="override hidden and attention dropout (default: config's 0.1)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="fp32 repeats (default 7, quick 2)")
    p.add_argument("--bf16-repeats", type=int, default=None, help="bf16 repeats (default 3, quick 1)")
    p.add_argument("--no-allpos", action="store_true", help="skip the ours_allpos arm")
    p.add_argument("--compile", action="store_true",
                   help="add arms with our encoder layers compiled (torch.compile, as train.py --compile)")
    return p.parse_args(argv)


def build_models(name: str, args, ctx, device, dtype_name: str):
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    from sctd_dist.hf import load_hf_state_dict
    from sctd_dist.model.bert import BertForMaskedLM
    from sctd_dist.model.config import BertModelConfig

    layers, hidden, heads, inter = MODELS[name]
    if name == "base-w":
        layers = args.base_layers
    overrides = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=inter, vocab_size=args.vocab)
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    cfg = BertModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(args.seed)
    hf = HFBertForMaskedLM(cfg.to_hf_config())
    ours = BertForMaskedLM(cfg, ctx)
    load_hf_state_dict(ours, hf.state_dict())
    ours.to(device)
    hf.to(device)
    compiled = None
    if args.compile:
        from sctd_dist.parallel.kernels import compile_each

        compiled = BertForMaskedLM(cfg, ctx)
        compiled.load_state_dict(ours.state_dict())
        compiled.to(device)
        compile_each(compiled.bert.encoder.layer)
    for model in (ours, hf, compiled):
        if model is not None and dtype_name != "fp32" and args.bf16_mode == "cast":
            model.to(common.DTYPES[dtype_name])
    info = {"model": name, **overrides,
            "hidden_dropout_prob": cfg.hidden_dropout_prob,
            "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "params": sum(p.numel() for p in hf.parameters())}
    return ours, hf, compiled, info


def autocast_ctx(device, dtype_name, args):
    if dtype_name == "fp32" or args.bf16_mode == "cast":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=common.DTYPES[dtype_name])


def make_steps(ours, hf, batch, allpos_labels, device, dtype_name, args, compiled=None):
    def ours_step(labels=batch["labels"], model=ours):
        model.zero_grad(set_to_none=True)
        with autocast_ctx(device, dtype_name, args):
            out = model(batch["input_ids"], batch["attention_mask"], labels, batch["token_type_ids"])
        out.loss.backward()
        return out.loss

    def hf_step():
        hf.zero_grad(set_to_none=True)
        with autocast_ctx(device, dtype_name, args):
            out = hf(**batch)
        out.loss.backward()
        return out.loss

    arms = {"ours": ours_step, "hf": hf_step}
    if allpos_labels is not None:
        arms["ours_allpos"] = lambda: ours_step(allpos_labels)
    if compiled is not None:
        arms["ours_compiled"] = lambda: ours_step(model=compiled)
        if allpos_labels is not None:
            arms["ours_allpos_compiled"] = lambda: ours_step(allpos_labels, compiled)
    return arms


def gemm_arm(tokens: int, cfg, dtype: torch.dtype, device: torch.device):
    """The model's FFN up-projection GEMM ([tokens, h] x [h, 4h]) GEMM_REPEATS times, and its
    FLOPs: the machine's matmul throughput at this model's shapes, threads and dtype."""
    import torch.nn.functional as F

    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device)
    w = torch.randn(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, device=device)

    def run() -> None:
        for _ in range(GEMM_REPEATS):
            F.linear(x, w)

    return run, GEMM_REPEATS * 2.0 * tokens * cfg.hidden_size * cfg.intermediate_size


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_share(step) -> float:
    """Fraction of one profiled call of `step` spent in matrix multiplications (CPU self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def model_flops(cfg, batch: int, seq: int, masked_per_seq: float) -> float:
    """Training matmul FLOPs of one step (forward + backward = 3x forward)."""
    from sctd_dist.flops import sequence_forward_flops

    return 3.0 * batch * sequence_forward_flops(cfg, seq, masked_per_seq)


def correctness(ours, hf, batch, device, dtype_name, args) -> dict:
    """Loss and gradient agreement of ours vs HF on one batch, eval mode (no dropout)."""
    ours.eval()
    hf.eval()
    arms = make_steps(ours, hf, batch, None, device, dtype_name, args)
    loss_ours = arms["ours"]().detach().float().item()
    g_ours = {n: p.grad.detach().float().clone() for n, p in ours.named_parameters() if p.grad is not None}
    loss_hf = arms["hf"]().detach().float().item()
    g_hf = {n: p.grad.detach().float() for n, p in hf.named_parameters() if p.grad is not None}
    num = den = 0.0
    for n, g in g_ours.items():
        ref = g_hf.get(n)
        if ref is None:
            continue
        if g.shape != ref.shape:  # padded vocabulary rows (ours) vs unpadded (HF)
            g = g[: ref.shape[0]]
        num += float((g - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    ours.train()
    hf.train()
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    return {"loss_ours": loss_ours, "loss_hf": loss_hf, "loss_abs_diff": abs(loss_ours - loss_hf),
            "loss_rel_diff": abs(loss_ours - loss_hf) / abs(loss_hf),
            "grad_rel_diff": (num / den) ** 0.5 if den else None}


def goals_of(case: dict) -> list[dict]:
    """The issue's goals that apply to this case, with value and verdict."""
    out = [{"goal": "ours/HF <= 1.0", "value": case["ratio_ours_over_hf"],
            "pass": case["ratio_ours_over_hf"] <= 1.0}]
    if case["dtype"] == "fp32" and case["ratio_allpos_over_hf"] is not None:
        out.append({"goal": f"equal work: ours_allpos/HF <= {GOAL_EQUAL_WORK}",
                    "value": case["ratio_allpos_over_hf"],
                    "pass": case["ratio_allpos_over_hf"] <= GOAL_EQUAL_WORK})
    if case["dtype"] == "fp32" and case["model"] == "base-w":
        eff = case["cpu_efficiency"]["ours"]
        out.append({"goal": f"CPU efficiency of our step >= {GOAL_CPU_EFFICIENCY}", "value": eff,
                    "pass": eff >= GOAL_CPU_EFFICIENCY})
    return out


def main(argv=None) -> int:
    common.use_tuned_allocator()
    args = parse_args(argv)
    device = common.setup_torch(args)
    env = common.environment(args, device)
    ctx = common.init_single_process()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = {"fp32": args.repeats or (2 if args.quick else 7),
               "bf16": args.bf16_repeats or (1 if args.quick else 3)}
    repeats["fp16"] = repeats["bf16"]
    models = [m for m in args.models.split(",") if m]
    seqs = [int(s) for s in args.seqs.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    table = QUICK_BATCH if args.quick else DEFAULT_BATCH

    print(f"# model_step: {env['device']} | threads {env['threads']} | torch {env['torch']}", flush=True)
    cases = []
    t_start = time.perf_counter()
    for dtype_name in dtypes:
        for name in models:
            ours, hf, compiled, minfo = build_models(name, args, ctx, device, dtype_name)
            for seq in seqs:
                bsz = args.batch or table.get((name, seq, dtype_name), 1) * args.batch_mult
                batch = common.mlm_batch(bsz, seq, args.vocab, args.mask_frac, device, args.seed + seq)
                allpos = None
                if not args.no_allpos:
                    allpos = batch["labels"].clone()
                    unl = allpos < 0
                    allpos[unl] = batch["input_ids"][unl]  # a target at every position
                check = correctness(ours, hf, batch, device, dtype_name, args)
                arms = make_steps(ours, hf, batch, allpos, device, dtype_name, args, compiled)
                arms["gemm"], gemm_flops = gemm_arm(bsz * seq, ours.config, common.DTYPES[dtype_name], device)
                t0 = time.perf_counter()
                cpu: dict[str, list[float]] = {}
                load0 = common.loadavg()
                raw = common.interleaved(arms, warmup, repeats[dtype_name], device, cpu)
                med = {k: common.median(v) for k, v in raw.items()}
                mins = {k: min(v) for k, v in raw.items()}
                cpu_med = {k: common.median(v) for k, v in cpu.items()}
                share = ({k: gemm_share(arms[k]) for k in arms if k != "gemm"}
                         if device.type == "cpu" else None)
                case = {
                    "model": name, "seq": seq, "dtype": dtype_name, "batch": bsz,
                    "masked_per_seq": int((batch["labels"][0] >= 0).sum()),
                    "config": minfo, "warmup": warmup, "repeats": repeats[dtype_name],
                    "bf16_mode": args.bf16_mode if dtype_name != "fp32" else None,
                    "times_s": raw, "median_s": med, "min_s": mins,
                    "cpu_times_s": cpu, "cpu_median_s": cpu_med,
                    "spread": {k: common.spread(v) for k, v in raw.items()},
                    "loadavg_before_after": [load0, common.loadavg()],
                    "tokens_per_s": {k: bsz * seq / v for k, v in med.items()},
                    "ratio_ours_over_hf": med["ours"] / med["hf"],
                    "ratios_over_hf": {k: v / med["hf"] for k, v in med.items() if k not in ("hf", "gemm")},
                    "ratio_allpos_over_hf": med["ours_allpos"] / med["hf"] if allpos is not None else None,
                    "ratio_ours_over_hf_min": mins["ours"] / mins["hf"],
                    "ratio_ours_over_hf_cpu": cpu_med["ours"] / cpu_med["hf"],
                    "goal_met": med["ours"] / med["hf"] <= 1.0,
                    "correctness_eval_mode": check,
                    "case_wall_s": time.perf_counter() - t0,
                }
                masked = case["masked_per_seq"]
                flops = {"ours": model_flops(ours.config, bsz, seq, masked),
                         "hf": model_flops(ours.config, bsz, seq, seq)}
                for arm in arms:
                    if arm.startswith("ours_allpos"):
                        flops[arm] = flops["hf"]
                    elif arm == "ours_compiled":
                        flops[arm] = flops["ours"]
                gemm_rate = gemm_flops / med["gemm"]
                case["tokens_per_s"].pop("gemm")
                case.update(
                    model_flops_per_step=flops, gemm_flops_per_s=gemm_rate,
                    model_flops_per_s={k: f / med[k] for k, f in flops.items()},
                    cpu_efficiency={k: f / med[k] / gemm_rate for k, f in flops.items()},
                    gemm_share=share)
                if share is not None:
                    case["equal_work_floor"] = share["hf"]
                    case["gemm_only_efficiency"] = {
                        k: case["cpu_efficiency"][k] / share[k] for k in flops}
                case["goals"] = goals_of(case)
                cases.append(case)
                eff = case["cpu_efficiency"]
                print(f"  {name:6s} s={seq:<4d} {dtype_name} b={bsz:<3d} ours {med['ours']:.3f}s "
                      f"hf {med['hf']:.3f}s ratio {case['ratio_ours_over_hf']:.3f} "
                      f"(min {case['ratio_ours_over_hf_min']:.3f}, cpu {case['ratio_ours_over_hf_cpu']:.3f})"
                      + (f" allpos/hf {case['ratio_allpos_over_hf']:.3f}" if allpos is not None else "")
                      + f" | CPU eff ours {eff['ours']:.2f} hf {eff['hf']:.2f}"
                      + (f" | GEMM share ours {share['ours']:.2f} hf {share['hf']:.2f}" if share else "")
                      + "".join(f" | {k}/hf {case['ratios_over_hf'][k]:.3f}"
                                for k in arms if k.endswith("_compiled"))
                      + f" | loss diff {check['loss_abs_diff']:.2e} grad rel {check['grad_rel_diff']:.2e}",
                      flush=True)
            del ours, hf, compiled

    headers = ["model", "layers", "seq", "dtype", "batch", "ours tok/s", "ours/HF",
               "ours/HF (min)", "ours_allpos/HF", "CPU eff ours", "CPU eff allpos", "CPU eff HF",
               "GEMM GFLOP/s", "GEMM share HF (equal-work floor)", "GEMM-only eff ours",
               "|loss diff|", "grad rel diff"]
    rows = [[c["model"], c["config"]["num_hidden_layers"], c["seq"], c["dtype"], c["batch"],
             round(c["tokens_per_s"]["ours"]), c["ratio_ours_over_hf"], c["ratio_ours_over_hf_min"],
             c["ratio_allpos_over_hf"] if c["ratio_allpos_over_hf"] is not None else "-",
             c["cpu_efficiency"]["ours"], c["cpu_efficiency"].get("ours_allpos", "-"),
             c["cpu_efficiency"]["hf"], c["gemm_flops_per_s"] / 1e9,
             c.get("equal_work_floor", "-"), c.get("gemm_only_efficiency", {}).get("ours", "-"),
             f"{c['correctness_eval_mode']['loss_abs_diff']:.1e}",
             f"{c['correctness_eval_mode']['grad_rel_diff']:.1e}"] for c in cases]
    md = common.markdown_table(headers, rows)
    wall = time.perf_counter() - t_start
    print()
    print(md)
    print(f"\nwall time {wall:.0f} s")
    payload = {"benchmark": "model_step", "environment": env,
               "settings": {k: v for k, v in vars(args).items()},
               "step": "zero_grad + forward(loss) + backward, train mode",
               "wall_s": wall, "cases": cases, "markdown": md}
    common.write_json(args, "model_step", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
