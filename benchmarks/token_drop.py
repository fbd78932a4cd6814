"""Training-step time of token-dropping modes none / vanilla / sctd, against the FLOP theory.

One step = zero_grad + PretrainingModel.forward(batch, step) (which also updates the
importance table) + backward + AdamW.step(), in train mode. The three modes run on three copies of the same weights,
interleaved step by step (order rotated every step) so that background load hits all alike.
Each repeat runs one full ScTD interval (default 10 steps) per mode: for sctd that is one
consistency step (a second, full-token pass + the KL terms) and nine plain dropping steps, and
its number is the mean over the interval. The reported time is the median over repeats.

    python benchmarks/token_drop.py --quick       # smoke run
    python benchmarks/token_drop.py               # full CPU run -> results/token_drop.json
    python benchmarks/token_drop.py --device cuda --width 1024 --heads 16 --inter 4096 --batch-mult 16
    python benchmarks/token_drop.py --arch modernbert --layers 12 --seqs 512,1024 --repeats 1
                                                  # ModernBERT block -> results/token_drop_modernbert.json

With --arch modernbert the FFN is a GeGLU (--inter is its intermediate size, default 1.5 x width
as in ModernBERT-base), so its matmul FLOPs count as an FFN of 1.5 x --inter; every 3rd layer is
global and the others slide a 128-token window, whose attention the CPU kernel computes in full
and masks (so the theory counts full attention for them too).

Theoretical saving: see `theory()` below (matmul FLOPs of the layer schedule, SPEC 2.1 / 6).
realised fraction = measured saving / theoretical saving, where saving = 1 - t_mode / t_none.
Goals: vanilla realises >= 90% of its theoretical saving at seq 512; the ScTD interval average
costs <= 0.87x the no-drop step at interval 10.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

from sctd_dist.flops import encoder_forward_flops  # noqa: E402

MODES = ("none", "vanilla", "sctd")
# (layers, seq) -> batch: 512 tokens per step at every seq (so the optimizer step, which dropping
# does not shorten, weighs the same), a ~0.7-3 s no-drop fp32 step at width 256 on 1 CPU core.
DEFAULT_BATCH = {(12, 128): 4, (12, 512): 1, (24, 128): 4, (24, 512): 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--arch", choices=("bert", "modernbert"), default="bert")
    p.add_argument("--layers", default="12,24")
    p.add_argument("--seqs", default="128,512")
    p.add_argument("--width", type=int, default=None, help="hidden size (default 256; quick 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4; quick 2)")
    p.add_argument("--inter", type=int, default=None, help="FFN size (default 4*width)")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: model.to(bfloat16) (DeepSpeed-style); fp32 is the CPU default")
    p.add_argument("--dropout", type=float, default=None, help="override hidden+attention dropout (default 0.1)")
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--interval", type=int, default=10, help="ScTD consistency interval Fi")
    p.add_argument("--mask-frac", type=float, default=0.15)
    p.add_argument("--batch", type=int, default=None, help="batch size for every case")
    p.add_argument("--batch-mult", type=int, default=1, help="multiply the default batch sizes (GPUs)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps per mode (default 2, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="intervals per mode (default 3, quick 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- FLOP theory
# layer_forward_flops / encoder_forward_flops (sctd_dist.flops) count the schedule of SPEC 2.1.
def theory(L: int, T: int, h: int, f: int, V: int, masked: int, keep_ratio: float,
           interval: int, split: int) -> dict:
    """Training FLOPs per sequence of each mode and the theoretical savings.

    training = 3 x forward (backward = 2 x forward). MLM head (transform h*h + tied decoder
    h*V) at the `masked` positions only, identical in every mode. The ScTD consistency step
    adds a full-token encoder pass trained through the KL terms (3 x forward); at the default
    --sctd-mlm-mix 0 that pass runs no MLM head.
    Not counted: embeddings, LayerNorm/GELU/softmax/dropout elementwise work, the router, the
    optimizer step - they are part of why the realised saving falls short of the theory."""
    k = int(keep_ratio * T + 0.5)
    head_fwd = 2 * masked * (h * h + h * V)
    enc_full = encoder_forward_flops(L, T, None, None, h, f)
    enc_drop = encoder_forward_flops(L, T, k, split, h, f)
    step_none = 3 * (enc_full + head_fwd)
    step_drop = 3 * (enc_drop + head_fwd)
    step_consistency = step_drop + 3 * enc_full
    sctd_avg = (step_consistency + (interval - 1) * step_drop) / interval
    # SPEC 6 yardstick per token, for reference: 6*N_layers + 12*L*s*h + 6*p*(h^2 + h*V).
    n_layers = L * (4 * h * h + 2 * h * f)
    spec6_per_token = 6 * n_layers + 12 * L * T * h + 6 * (masked / T) * (h * h + h * V)
    return {
        "kept_tokens": k, "split_layer": split,
        "flops_per_seq": {"none": step_none, "vanilla": step_drop, "sctd_consistency_step": step_consistency,
                          "sctd_interval_avg": sctd_avg},
        "encoder_forward_flops_per_seq": {"full": enc_full, "drop": enc_drop},
        "head_share_of_none_step": 3 * head_fwd / step_none,
        "theoretical_ratio": {"vanilla": step_drop / step_none, "sctd": sctd_avg / step_none},
        "theoretical_saving": {"vanilla": 1 - step_drop / step_none, "sctd": 1 - sctd_avg / step_none},
        "theoretical_saving_encoder_only": 1 - enc_drop / enc_full,
        "spec6_flops_per_token_none": spec6_per_token,
        "spec6_vs_ours_none": spec6_per_token * T / step_none,
    }


def package_flops(cfg, L: int, T: int, masked: int, keep_ratio: float, interval: int) -> dict | None:
    """sctd_dist.flops' count of the same steps (a cross-check of `theory`)."""
    try:
        from sctd_dist import flops
        from sctd_dist.model.config import TokenDropConfig
    except ImportError:
        return None
    k = int(keep_ratio * T + 0.5)
    out = {}
    for mode in MODES:
        drop = TokenDropConfig(mode=mode, keep_ratio=keep_ratio, sctd_interval=interval)
        steps = [flops.step_flops_per_sequence(cfg, drop, T, masked, s, k if drop.enabled else None)
                 for s in range(interval)]
        out[mode] = sum(steps) / interval
    return out


# ----------------------------------------------------------------------------- the run
def build(mode: str, cfg, args, ctx, device, state=None):
    from sctd_dist.model.config import TokenDropConfig
    from sctd_dist.data.tokenizer import SpecialTokenIds
    from sctd_dist.model.pretraining import PretrainingModel

    drop = TokenDropConfig(mode=mode, keep_ratio=args.keep_ratio, sctd_interval=args.interval)
    model = PretrainingModel(cfg, drop, SpecialTokenIds(cls=2, sep=3, mask=4, unk=1, pad=0), ctx)
    if state is not None:
        model.load_state_dict(state)
    model.to(device)
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    return model, opt


def make_step(model, opt, batch, device):
    """Returns step(i) -> (wall, fwd+bwd wall, optimizer+importance wall, process CPU time)."""

    def fwd_bwd(i):
        opt.zero_grad(set_to_none=True)
        out = model(batch, step=i)
        out.loss.backward()

    def opt_step():
        opt.step()

    def step(i):
        t_fb, c_fb = common.timed2(lambda: fwd_bwd(i), device)
        t_opt, c_opt = common.timed2(opt_step, device)
        return t_fb + t_opt, t_fb, t_opt, c_fb + c_opt

    return step


def run_case(L: int, T: int, args, ctx, device) -> dict:
    from sctd_dist.model.config import TokenDropConfig

    h, heads = args.width, args.heads
    cfg, overrides = model_config(L, T, args)
    f = cfg.intermediate_size * 3 // 2 if args.arch == "modernbert" else cfg.intermediate_size
    bsz = args.batch or (1 if args.quick else DEFAULT_BATCH.get((L, T), 1)) * args.batch_mult
    batch = common.mlm_batch(bsz, T, args.vocab, args.mask_frac, device, args.seed + T)
    masked = int((batch["labels"][0] >= 0).sum())

    torch.manual_seed(args.seed)
    models = {}
    base_state = None
    for mode in MODES:
        models[mode] = build(mode, cfg, args, ctx, device, base_state)
        if base_state is None:
            base_state = copy.deepcopy(models[mode][0].state_dict())
    steps = {m: make_step(models[m][0], models[m][1], batch, device) for m in MODES}

    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (1 if args.quick else 3)
    Fi = args.interval
    # Warmup: a consistency step and plain steps for every mode (step ids outside the timed ones).
    for w in range(warmup):
        for m in common.rotate(list(MODES), w):
            steps[m](w)  # w = 0 is step 0: an ScTD consistency step
    common.sync(device)

    load0 = common.loadavg()
    keys = ("step", "fwd_bwd", "opt", "cpu")
    raw = {m: {k: [] for k in keys} for m in MODES}  # raw[mode][key][repeat][j]
    for r in range(repeats):
        per = {m: {k: [] for k in keys} for m in MODES}
        for j in range(Fi):
            i = (r + 1) * Fi + j  # step id: j == 0 is the ScTD consistency step of the interval
            for m in common.rotate(list(MODES), r * Fi + j):
                for key, value in zip(keys, steps[m](i)):
                    per[m][key].append(value)
        for m in MODES:
            for key in per[m]:
                raw[m][key].append(per[m][key])
    # Per repeat: mean over the interval (for sctd: 1 consistency + Fi-1 plain steps).
    interval_mean = {m: {key: [sum(x) / len(x) for x in raw[m][key]] for key in raw[m]} for m in MODES}
    med = {m: {key: common.median(v) for key, v in interval_mean[m].items()} for m in MODES}
    sctd_cons = common.median([x[0] for x in raw["sctd"]["step"]])
    sctd_plain = common.median([sum(x[1:]) / (len(x) - 1) for x in raw["sctd"]["step"]]) if Fi > 1 else None

    # Load-robust second estimate (noise on a shared machine only ever adds time): the fastest
    # observed step of each kind; sctd = (fastest consistency step + (Fi-1) x fastest plain step)/Fi.
    flat = {m: [t for rep in raw[m]["step"] for t in rep] for m in MODES}
    min_est = {"none": min(flat["none"]), "vanilla": min(flat["vanilla"])}
    cons_all = [rep[0] for rep in raw["sctd"]["step"]]
    plain_all = [t for rep in raw["sctd"]["step"] for t in rep[1:]]
    min_est["sctd"] = (min(cons_all) + (Fi - 1) * min(plain_all)) / Fi if Fi > 1 else min(cons_all)

    # Paired estimate (cancels slow load drift): ratios of steps run back to back in the same
    # round, median over rounds; sctd = (consistency-step ratio + (Fi-1) x plain-step ratio)/Fi.
    pairs_v = [v / n for rn, rv in zip(raw["none"]["step"], raw["vanilla"]["step"]) for n, v in zip(rn, rv)]
    pairs_c = [rs[0] / rn[0] for rn, rs in zip(raw["none"]["step"], raw["sctd"]["step"])]
    pairs_p = [s_ / n for rn, rs in zip(raw["none"]["step"], raw["sctd"]["step"]) for n, s_ in zip(rn[1:], rs[1:])]
    paired_ratio = {"vanilla": common.median(pairs_v),
                    "sctd": (common.median(pairs_c) + (Fi - 1) * common.median(pairs_p)) / Fi
                    if Fi > 1 else common.median(pairs_c)}

    split = TokenDropConfig(keep_ratio=args.keep_ratio).resolve_split_layer(L)
    th = theory(L, T, h, f, args.vocab, masked, args.keep_ratio, Fi, split)
    measured_ratio = {m: med[m]["step"] / med["none"]["step"] for m in ("vanilla", "sctd")}
    measured_ratio_fb = {m: med[m]["fwd_bwd"] / med["none"]["fwd_bwd"] for m in ("vanilla", "sctd")}
    measured_ratio_cpu = {m: med[m]["cpu"] / med["none"]["cpu"] for m in ("vanilla", "sctd")}
    realised = {m: (1 - measured_ratio[m]) / th["theoretical_saving"][m] for m in ("vanilla", "sctd")}
    realised_fb = {m: (1 - measured_ratio_fb[m]) / th["theoretical_saving"][m] for m in ("vanilla", "sctd")}
    realised_cpu = {m: (1 - measured_ratio_cpu[m]) / th["theoretical_saving"][m] for m in ("vanilla", "sctd")}
    min_ratio = {m: min_est[m] / min_est["none"] for m in ("vanilla", "sctd")}
    realised_paired = {m: (1 - paired_ratio[m]) / th["theoretical_saving"][m] for m in ("vanilla", "sctd")}
    realised_min = {m: (1 - min_ratio[m]) / th["theoretical_saving"][m] for m in ("vanilla", "sctd")}
    pkg = package_flops(cfg, L, T, masked, args.keep_ratio, Fi)
    return {
        "layers": L, "seq": T, "batch": bsz, "masked_per_seq": masked,
        "config": {**overrides, "arch": args.arch, "ffn_matmul_width": f,
                   "hidden_dropout_prob": getattr(cfg, "hidden_dropout_prob", cfg.embedding_dropout),
                   "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
                   "keep_ratio": args.keep_ratio, "sctd_interval": Fi, "dtype": args.dtype,
                   "optimizer": f"torch.optim.AdamW(lr={args.lr})"},
        "warmup_steps": warmup, "repeats": repeats,
        # raw[mode][step|fwd_bwd|opt|cpu][repeat][step in interval]; step = fwd_bwd + opt (wall),
        # cpu = process CPU time of the whole step
        "raw_times_s": raw,
        "interval_mean_s": interval_mean,
        "median_s": med,
        "sctd_consistency_step_median_s": sctd_cons,
        "sctd_plain_step_median_s": sctd_plain,
        "measured_ratio_vs_none": measured_ratio,
        "measured_ratio_vs_none_fwd_bwd_only": measured_ratio_fb,
        "measured_ratio_vs_none_cpu_time": measured_ratio_cpu,
        "measured_saving": {m: 1 - v for m, v in measured_ratio.items()},
        "theory": th,
        "package_flops_per_seq": pkg,
        "realised_fraction": realised,
        "realised_fraction_fwd_bwd_only": realised_fb,
        "realised_fraction_cpu_time": realised_cpu,
        "measured_ratio_vs_none_paired": paired_ratio,
        "realised_fraction_paired": realised_paired,
        "min_estimate_s": min_est,
        "measured_ratio_vs_none_min": min_ratio,
        "realised_fraction_min": realised_min,
        "goals": {"vanilla_realised_ge_0.9": realised["vanilla"] >= 0.9 if T >= 512 else None,
                  "sctd_ratio_le_0.87": measured_ratio["sctd"] <= 0.87,
                  "vanilla_realised_ge_0.9_paired": realised_paired["vanilla"] >= 0.9 if T >= 512 else None,
                  "sctd_ratio_le_0.87_paired": paired_ratio["sctd"] <= 0.87,
                  "vanilla_realised_ge_0.9_min": realised_min["vanilla"] >= 0.9 if T >= 512 else None,
                  "sctd_ratio_le_0.87_min": min_ratio["sctd"] <= 0.87},
        "loadavg_before_after": [load0, common.loadavg()],
    }


def model_config(L: int, T: int, args):
    """(config, the overrides it was made with) of the benchmarked encoder."""
    from sctd_dist.model.arch import config_from_preset

    h = args.width
    modern = args.arch == "modernbert"
    overrides = dict(num_hidden_layers=L, hidden_size=h, num_attention_heads=args.heads,
                     intermediate_size=args.inter or (3 * h // 2 if modern else 4 * h),
                     vocab_size=args.vocab, max_position_embeddings=max(512, T))
    if modern:
        overrides.update(local_attention=128, pad_token_id=0, cls_token_id=2, sep_token_id=3)
    if args.dropout is not None:
        names = ("embedding_dropout", "attention_dropout", "mlp_dropout") if modern else (
            "hidden_dropout_prob", "attention_probs_dropout_prob")
        overrides.update({n: args.dropout for n in names})
    return config_from_preset(args.arch, "tiny", **overrides), overrides


def yes_no(*verdicts: bool | None) -> str:
    """Goal verdicts of the median / paired / min estimates."""
    if verdicts[0] is None:
        return "-"
    return "/".join("yes" if ok else "NO" for ok in verdicts)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.width = args.width or (64 if args.quick else 256)
    args.heads = args.heads or (2 if args.quick else 4)
    device = common.setup_torch(args)
    env = common.environment(args, device)
    ctx = common.init_single_process()
    layers = [int(x) for x in args.layers.split(",") if x]
    seqs = [int(x) for x in args.seqs.split(",") if x]
    print(f"# token_drop: {env['device']} | threads {env['threads']} | torch {env['torch']} | "
          f"width {args.width} heads {args.heads} {args.dtype}", flush=True)
    t_start = time.perf_counter()
    cases = []
    for L in layers:
        for T in seqs:
            t0 = time.perf_counter()
            c = run_case(L, T, args, ctx, device)
            c["case_wall_s"] = time.perf_counter() - t0
            cases.append(c)
            m = c["median_s"]
            print(f"  L={L:<2d} s={T:<4d} b={c['batch']}: none {m['none']['step']:.3f}s "
                  f"vanilla {m['vanilla']['step']:.3f}s ({c['measured_ratio_vs_none']['vanilla']:.3f}x, "
                  f"theory {c['theory']['theoretical_ratio']['vanilla']:.3f}x, realised "
                  f"{c['realised_fraction']['vanilla']:.2f}) sctd {m['sctd']['step']:.3f}s "
                  f"({c['measured_ratio_vs_none']['sctd']:.3f}x, theory "
                  f"{c['theory']['theoretical_ratio']['sctd']:.3f}x) | paired: vanilla "
                  f"{c['measured_ratio_vs_none_paired']['vanilla']:.3f}x sctd "
                  f"{c['measured_ratio_vs_none_paired']['sctd']:.3f}x"
                  f" [{c['case_wall_s']:.0f}s]", flush=True)

    # Three estimators per ratio, "median / paired / min": median of per-repeat interval means
    # (primary), median of back-to-back paired ratios, fastest observed steps.
    headers = ["layers", "seq", "batch", "none s", "vanilla s", "sctd avg s", "sctd cons. step s",
               "vanilla/none", "theory", "realised", "realised fwd+bwd", "sctd/none", "theory",
               "realised", "goal vanilla >=0.9 @512", "goal sctd <=0.87"]
    rows = []
    for c in cases:
        m, th, g = c["median_s"], c["theory"]["theoretical_ratio"], c["goals"]

        def three(key_median, key_paired, key_min, mode, c=c):
            return " / ".join(f"{c[k][mode]:.3f}" for k in (key_median, key_paired, key_min))

        ratios = ("measured_ratio_vs_none", "measured_ratio_vs_none_paired", "measured_ratio_vs_none_min")
        realised = ("realised_fraction", "realised_fraction_paired", "realised_fraction_min")
        rows.append([c["layers"], c["seq"], c["batch"], m["none"]["step"], m["vanilla"]["step"],
                     m["sctd"]["step"], c["sctd_consistency_step_median_s"],
                     three(*ratios, "vanilla"), th["vanilla"], three(*realised, "vanilla"),
                     c["realised_fraction_fwd_bwd_only"]["vanilla"],
                     three(*ratios, "sctd"), th["sctd"], three(*realised, "sctd"),
                     yes_no(g["vanilla_realised_ge_0.9"], g["vanilla_realised_ge_0.9_paired"],
                            g["vanilla_realised_ge_0.9_min"]),
                     yes_no(g["sctd_ratio_le_0.87"], g["sctd_ratio_le_0.87_paired"],
                            g["sctd_ratio_le_0.87_min"])])
    md = common.markdown_table(headers, rows)
    wall = time.perf_counter() - t_start
    print()
    print(md)
    print(f"\nwall time {wall:.0f} s")
    payload = {"benchmark": "token_drop", "environment": env, "settings": dict(vars(args)),
               "step": "zero_grad + forward(batch, step) (which updates the importance table) + backward + AdamW.step",
               "wall_s": wall, "cases": cases, "markdown": md}
    common.write_json(args, "token_drop" if args.arch == "bert" else f"token_drop_{args.arch}", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
