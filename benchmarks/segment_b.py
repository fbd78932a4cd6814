"""Segment B at fine-tuning: start token type 1 from segment A's row (`--segment-b copy`, what
`auto` does for our models) or keep its untrained initialisation (`--segment-b keep`), on a pair
task, over several seeds.

The pair task is built here so that the answer needs both segments: sentence 1 and sentence 2
each speak of the network or of files, and the label says whether they speak of the same thing
(balanced). Both arms fine-tune the same model with the same grid point and seeds through
`sctd_dist.finetune`; the result is each arm's accuracy per seed, and whether the difference of
the means exceeds the seed spread.

    python benchmarks/segment_b.py --model runs/demo/hf          # -> results/segment_b.json
    python benchmarks/segment_b.py --model DIR --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repo root on sys.path)

NETWORK = ["socket", "server", "address", "port", "request", "protocol", "connection", "client", "host", "url"]
FILES = ["file", "path", "folder", "directory", "archive", "filename", "disk", "record", "line", "stream"]
FILLER = ["the", "returns", "a", "new", "value", "from", "this", "object", "when", "called", "with", "its"]


def _sentence(rng: random.Random, topic: list[str]) -> str:
    words = rng.sample(FILLER, 3) + rng.sample(topic, 3)
    rng.shuffle(words)
    return " ".join(words)


def pair_rows(n: int, seed: int) -> list[dict]:
    """`n` balanced pairs: label 1 when both sentences share a topic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        first = rng.random() < 0.5
        same = i % 2 == 0
        second = first if same else not first
        rows.append({"sentence1": _sentence(rng, NETWORK if first else FILES),
                     "sentence2": _sentence(rng, NETWORK if second else FILES), "label": int(same)})
    return rows


def run_arm(args, mode: str, files: tuple[Path, Path], work: Path) -> dict:
    from sctd_dist.finetune.cli import run
    from sctd_dist.finetune.config import FinetuneConfig, TrainSettings

    cfg = FinetuneConfig(model=Path(args.model), out=work / mode, train_file=files[0], validation_file=files[1],
                         task_name="topic-pairs", segment_b=mode, learning_rates=[args.lr], seeds=args.seeds,
                         settings=TrainSettings(max_steps=args.steps, batch_size=args.batch), max_seq_length=32,
                         threads=args.threads, progress=False)
    started = time.perf_counter()
    task = run(cfg, argv=[])["tasks"]["topic-pairs"]
    accuracy = [r["eval"]["validation"]["metrics"]["accuracy"] for r in task["runs"]]
    return {"accuracy": accuracy, "mean": statistics.fmean(accuracy),
            "std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "single_class_runs": sum(1 for r in task["runs"] if r["eval"]["validation"]["single_prediction"]),
            "wall_s": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="an exported model or checkpoint folder")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-rows", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    common.add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.train_rows = 10, [1, 2], 64
    common.setup_torch(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = []
        for name, rows in (("train", pair_rows(args.train_rows, 1)), ("validation", pair_rows(300, 2))):
            files.append(work / f"{name}.jsonl")
            files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
        arms = {mode: run_arm(args, mode, (files[0], files[1]), work) for mode in ("copy", "keep")}
    difference = arms["copy"]["mean"] - arms["keep"]["mean"]
    spread = max(arms["copy"]["std"], arms["keep"]["std"])
    payload = {"settings": common.plain_settings(args), "arms": arms, "copy_minus_keep": difference,
               "largest_seed_std": spread, "exceeds_seed_spread": abs(difference) > spread}
    print(f"copy {arms['copy']['mean']:.4f} ± {arms['copy']['std']:.4f}, keep {arms['keep']['mean']:.4f} ± "
          f"{arms['keep']['std']:.4f}: difference {difference:+.4f}, "
          f"{'exceeds' if abs(difference) > spread else 'within'} the seed spread")
    common.write_json(args, "segment_b", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
