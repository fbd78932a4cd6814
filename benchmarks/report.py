"""Collect `benchmarks/results/*.json` into one markdown page, `benchmarks/results/RESULTS.md`.

Every number on the page is read from a result file; nothing is typed in by hand. Each section
names the file, the command and the machine that produced it, so a reader can rerun exactly
that. A missing result file leaves its section out with a note (`gpu.json` exists only after
`benchmarks/gpu.sh` ran on a GPU machine).

    python benchmarks/report.py [--results DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

from common import RESULTS_DIR, markdown_table
from convergence import late_mean


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _provenance(d: dict[str, Any], name: str) -> str:
    env = d.get("environment", {})
    # The interpreter's absolute path says nothing to a reader: show `python`.
    command = re.sub(r"^\S*python[0-9.]*\s", "python ", env.get("command") or d.get("command") or "?")
    parts = [f"`results/{name}.json`", f"command `{command}`"]
    if env.get("device"):
        parts.append(f"{env['device']}, {env.get('threads')} thread(s)")
    elif d.get("device"):
        parts.append(str(d["device"]))
    if env.get("timestamp"):
        parts.append(env["timestamp"])
    if env.get("git_commit"):
        parts.append(f"commit {env['git_commit'][:10]}")
    return "*" + "; ".join(parts) + "*"


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "not met")


def token_drop(d: dict[str, Any]) -> str:
    rows = []
    for c in d["cases"]:
        med, th, real = c["median_s"], c["theory"]["theoretical_ratio"], c["realised_fraction"]
        tokens = c["batch"] * c["seq"]
        ratio = c["measured_ratio_vs_none"]
        rows.append([c["layers"], c["seq"],
                     *(f"{tokens / med[m]['step']:,.0f}" for m in ("none", "vanilla", "sctd")),
                     f"{ratio['vanilla']:.3f}", f"{th['vanilla']:.3f}", f"{real['vanilla']:.0%}",
                     f"{ratio['sctd']:.3f}", f"{th['sctd']:.3f}", f"{real['sctd']:.0%}"])
    table = markdown_table(["layers", "seq", "none tok/s", "vanilla tok/s", "ScTD tok/s",
                            "vanilla/none", "theory", "realised", "ScTD/none", "theory", "realised"], rows)
    return (f"{table}\n\nStep time includes the optimizer step and the importance update. "
            "`realised` = measured saving / theoretical FLOP saving (goal: vanilla >= 90% at seq 512); "
            "ScTD is averaged over one consistency interval (one step with the extra full-token pass).")


def scaling(d: dict[str, Any]) -> str:
    return d["table"]


def zero_stages(d: dict[str, Any]) -> str:
    return d["table"] + "\n\nModel states = parameters (or their ZeRO partition), fp32 master partitions and Adam moments held by one rank; DP=2, fp32."


def model_step(d: dict[str, Any]) -> str:
    rows = []
    for c in d["cases"]:
        eff = c.get("cpu_efficiency", {})
        rows.append([c["model"], c["seq"], c["dtype"], c["batch"], f"{c['tokens_per_s']['ours']:,.0f}",
                     f"{c['tokens_per_s']['hf']:,.0f}", f"{c['ratio_ours_over_hf']:.2f}",
                     f"{c['ratio_allpos_over_hf']:.2f}" if c.get("ratio_allpos_over_hf") else "-",
                     f"{eff['ours']:.2f}" if "ours" in eff else "-",
                     f"{eff['hf']:.2f}" if "hf" in eff else "-",
                     f"{c['gemm_flops_per_s'] / 1e9:.0f}" if "gemm_flops_per_s" in c else "-",
                     f"{c['equal_work_floor']:.2f}" if "equal_work_floor" in c else "-",
                     f"{c['gemm_only_efficiency']['ours']:.2f}" if "gemm_only_efficiency" in c else "-",
                     f"{c['correctness_eval_mode']['grad_rel_diff']:.1e}"])
    table = markdown_table(["model", "seq", "dtype", "batch", "ours tok/s", "transformers tok/s",
                            "time ours/HF", "equal work: ours all-positions/HF", "CPU efficiency ours",
                            "CPU efficiency HF", "FFN GEMM GFLOP/s", "equal-work floor (HF GEMM share)",
                            "GEMM-only efficiency ours", "grad rel diff"], rows)
    compiled = [f"- {c['model']} s{c['seq']} {c['dtype']}: " + ", ".join(
                    f"{k}/HF {v:.2f}" for k, v in c["ratios_over_hf"].items() if k.endswith("_compiled"))
                for c in d["cases"] if any(k.endswith("_compiled") for k in c.get("ratios_over_hf", {}))]
    if compiled:
        compiled.insert(0, "Our encoder layers compiled (`torch.compile`, as `train.py --compile`), time over transformers':")
        compiled.append("")
    verdict = {True: "met", False: "not met"}
    goals = [f"- {c['model']} s{c['seq']} {c['dtype']}: {g['goal']}: {g['value']:.2f}, {verdict[g['pass']]}"
             for c in d["cases"] for g in c.get("goals", []) if not g["goal"].startswith("ours/HF")]
    return "\n".join([
        table, "",
        "Same config, weights and batch; one step = forward + backward. We compute MLM logits at the "
        "masked positions only; `equal work` gives our model a label at every position (transformers' "
        "amount of head work), which separates that saving from kernel speed. CPU efficiency = model "
        "FLOP/s (`sctd_dist.flops`, for the positions each model predicts) over the FLOP/s of the "
        "model's FFN GEMM timed in the same loop. The floor columns come from one profiled step per "
        "arm: the equal-work floor is the fraction of transformers' step spent in GEMMs (the equal-work "
        "ratio of an implementation that runs its GEMMs as fast and spends nothing else); GEMM-only "
        "efficiency is our CPU efficiency if everything but the GEMMs were free.", "", *compiled, *goals])


def train_vs_hf(d: dict[str, Any]) -> str:
    s = d["settings"]
    verdict = {True: "met", False: "not met"}
    goals = [f"- {g['goal']}: {g['value']:.2f}x, {verdict[g['pass']]}" for g in d["goals"]]
    return "\n".join([
        d["table"], "",
        f"`{s['model']}` model, seq {s['seq_length']}, micro-batch {s['micro_batch']}, global batch "
        f"{s['global_batch']}, 1 rank x {s['threads']} thread, `{Path(s['ds_config']).name}`, the same "
        f"data pipeline and allocator; {s['rounds']} rounds of {s['train_iters']} steps per arm, tokens/s = "
        "median over whole ScTD intervals after the first 10 steps.", "", *goals])


def allocator(d: dict[str, Any]) -> str:
    s = d["settings"]
    return "\n".join([
        d["table"], "",
        f"Base width, {s['layers']} layers, seq {s['seq']}, batch {s['batch']}, fp32, {s['threads']} "
        f"thread; each allocator in its own processes, {s['rounds']} rounds in rotated order; "
        f"the launch default here is `{d['default_choice']}`."])


def data_pipeline(d: dict[str, Any]) -> str:
    prep, loader = d["preparation"], d["loader"]
    rows = [[name, f"{v['tokens_per_s_median']:,.0f}", f"{v['tokens_per_cpu_s_median']:,.0f}"]
            for name, v in prep.items()]
    table = markdown_table(["preparation", "tokens/s (median)", "tokens per CPU-second"], rows)
    return (f"{table}\n\nPreparation vs `datasets.map` with the same fast tokenizer: "
            f"**{d['preparation_speedup_vs_datasets_map_2_cores']:.2f}x** on 2 cores. Loader + masking: "
            f"**{loader['overhead_fraction_token_masking']:.2%}** of a training step "
            f"(whole-word masking {loader['overhead_fraction_whole_word_masking']:.2%}; goal <= 2%).")


def convergence(d: dict[str, Any]) -> str:
    s = d["settings"]
    arms = d["arms"]
    lines = [d["table"], "",
             f"Model: {s['layers']} layers, hidden {s['hidden']}, seq {s['seq_length']}, batch {s['batch']}, "
             f"lr {s['lr']}; {s['budget_s']:.0f} s of training per arm, interleaved in one process; "
             "held-out MLM loss with all tokens on the same held-out rows for every arm."]
    if {"vanilla", "sctd"} <= set(arms):
        v, c = arms["vanilla"]["evals"], arms["sctd"]["evals"]
        loss_v, loss_c = late_mean(v, "eval_loss"), late_mean(c, "eval_loss")
        cos_v, cos_c = late_mean(v, "cls_cosine_centered"), late_mean(c, "cls_cosine_centered")
        lines += ["",
                  f"- Goal, ScTD held-out loss <= vanilla at equal wall-clock: final {c[-1]['eval_loss']:.4f} "
                  f"vs {v[-1]['eval_loss']:.4f}, mean over the second half {loss_c:.4f} vs {loss_v:.4f}: "
                  f"**{_yes(loss_c <= loss_v)}** (by the second-half mean).",
                  f"- Goal, drift curve higher for ScTD: centered [CLS] cosine, mean over the second half, "
                  f"{cos_c:.3f} vs {cos_v:.3f}: **{_yes(cos_c > cos_v)}**."]
    lines += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in d.get("plots", [])]]
    return "\n".join(lines)


def quality(d: dict[str, Any]) -> str:
    from quality import summarize, table, verdicts

    s = d["settings"]
    summary, comparisons = summarize(d)  # derived from the raw per-seed records in the file
    majority = ", ".join(f"{t} {v:.3f}" for t, v in d.get("majority_class_accuracy", {}).items())
    lines = [table(d, summary), "",
             f"Model: {s['layers']} layers, hidden {s['hidden']}, seq {s['seq_length']}, batch {s['batch']}, "
             f"lr {s['lr']}; {s['budget_s']:.0f} s of training per arm and seed, seeds {s['seeds']}, every arm "
             "of every seed interleaved in one process; mean ± std over seeds. Each final model fine-tuned on "
             f"{', '.join(s['tasks'])} (lr {s['ft_lr']}, {s['ft_epochs']:g} epochs, its pretraining seed)"
             + (f"; majority-class accuracy {majority}." if majority else "."), "",
             "Differences between arms, and whether they exceed the seed spread (the arms' min-max ranges "
             "over seeds do not overlap):", "", *[f"- {v}" for v in verdicts(comparisons)], "",
             *[f"![{Path(p).stem}]({Path(p).name})" for p in d.get("plots", [])]]
    return "\n".join(lines)


def gpu(d: dict[str, Any]) -> str:
    if not d.get("complete"):
        return "The last run did not finish; its finished arms are in the JSON."
    verdict = {True: "met", False: "not met", None: "n/a"}
    goals = [f"- {g['goal']}: {'n/a' if g['value'] is None else format(g['value'], '.3f')}, "
             f"{verdict[g['pass']]}" for g in d.get("goals", [])]
    return "\n".join([f"Device: {d['device']} (peak {d.get('peak_tflops')} TFLOP/s bf16).", "",
                      d["table"], "", *goals])


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("token_drop", "Token dropping: throughput against theory", token_drop),
    ("token_drop_modernbert", "Token dropping on the modern block (ModernBERT): throughput against theory",
     token_drop),
    ("convergence", "Quality at equal wall-clock, and semantic drift", convergence),
    ("quality", "Time to quality over seeds, and downstream scores", quality),
    ("quality_modernbert", "Time to quality over seeds on the modern block (ModernBERT)", quality),
    ("scaling", "Tensor and data parallelism on 2 ranks", scaling),
    ("zero_stages", "Memory per rank per ZeRO stage", zero_stages),
    ("model_step", "Our model against transformers' BertForMaskedLM", model_step),
    ("train_vs_hf", "Training through train.py against transformers' BertForMaskedLM", train_vs_hf),
    ("train_vs_hf_modernbert", "Training through train.py against transformers' ModernBertForMaskedLM",
     train_vs_hf),
    ("allocator", "CPU memory allocator", allocator),
    ("data_pipeline", "Data pipeline", data_pipeline),
    ("gpu", "GPU: BERT-large and ModernBERT-large throughput and MFU", gpu),
]


def render(folder: Path) -> str:
    out = ["# Benchmark results", "",
           "Generated by `benchmarks/report.py` from the JSON files in this folder (`make bench` "
           "reruns everything on CPU). Arms compared in one table were measured side by side in one "
           "run; compare ratios, not absolute numbers across tables or machines.", ""]
    for name, title, fn in SECTIONS:
        out.append(f"## {title}")
        out.append("")
        d = _load(folder, name)
        if d is None:
            hint = " Run `benchmarks/gpu.sh` on a GPU machine." if name == "gpu" else ""
            out += [f"No `{name}.json` yet.{hint}", ""]
            continue
        out += [_provenance(d, name), "", fn(d), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--out", type=Path, default=None, help="default: RESULTS.md in --results")
    args = p.parse_args(argv)
    out = args.out or args.results / "RESULTS.md"
    out.write_text(render(args.results))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
