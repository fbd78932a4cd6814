"""A weighted blend of two prepared folders and the warmup-stable-decay schedule, trained through
the real entry point (torchrun, 2 CPU ranks, fp32, ScTD): per-source counts in every record, the
same counts at any DP size and after a TP2 -> TP1 x DP2 resume, exact restarts of the main run
and of a decay branch, learning rates equal to the WSD formula, and mixtures refused in one line.

One 40-step run (DP=2) is the reference; its step-20 checkpoint seeds the restart, the branch
and nothing else, so the whole module costs six launches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sctd_dist import checkpoint
from sctd_dist.lr_schedule import WSD
from tests.conftest import SEQ
from tests.training import launch

STEPS, HALF, GLOBAL, WARMUP, PEAK = 40, 20, 8, 4, 5e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_dir):
    """The shared sample folder (A), a small folder with its tokenizer (B, fewer rows than the
    run takes from it), one at another sequence length and one with another tokenizer."""
    from sctd_dist.data.prepare import prepare_corpus
    from sctd_dist.data.sample import write_sample_corpus

    root = tmp_path_factory.mktemp("blend")
    corpus = write_sample_corpus(root / "b.txt", target_bytes=15_000)
    tokenizer = str(Path(data_dir) / "tokenizer")
    common = dict(validation_fraction=0.05, seed=3, progress=False, datasets_cache_dir=root / "hf")
    small = prepare_corpus([str(corpus)], root / "b", SEQ, tokenizer=tokenizer, **common)
    short = prepare_corpus([str(corpus)], root / "s32", 32, tokenizer=tokenizer, **common)
    other = prepare_corpus([str(corpus)], root / "tok", SEQ, train_tokenizer_vocab=400, **common)
    return {"A": str(data_dir), "B": str(small), "short": str(short), "other": str(other)}


def _args(folders, tmp, name, *extra):
    return ["--data-path", "0.75", folders["A"], "0.25", folders["B"], "--seq-length", str(SEQ),
            "--token-drop", "sctd", "--sctd-interval", "4", "--global-batch-size", str(GLOBAL),
            "--micro-batch-size", "2", "--eval-iters", "0", "--no-progress", "--lr-schedule", "wsd",
            "--lr-warmup-iters", str(WARMUP), "--lr-decay-start", "1000", "--lr-wsd-decay-iters", "20",
            "--train-iters", str(STEPS), "--save", str(tmp / name / "ckpt"), "--save-interval", str(HALF),
            "--log-dir", str(tmp / name / "logs"), *extra]


def _train(*args: str) -> None:
    launch.train(2, *args, timeout=900)  # generous: a loaded machine, not a hang, is what runs long


def _records(log_dir) -> dict[int, dict]:
    """Training records by step; a restarted run's replace the earlier ones."""
    out = {}
    for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:
            out[rec["step"]] = rec
    return out


def _copy_checkpoint(src: Path, step: int, dest: Path) -> Path:
    tag = checkpoint.tag_for(step)
    shutil.copytree(src / tag, dest / tag, ignore=shutil.ignore_patterns("resharded"))
    (dest / checkpoint.LATEST).write_text(tag)
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folders):
    tmp = tmp_path_factory.mktemp("mix")
    _train(*_args(folders, tmp, "ref"))
    return tmp, _records(tmp / "ref" / "logs")


def _dp1_stream(folders, steps: int, mlm_probability: float = 0.15) -> list[tuple[dict, int, int]]:
    """(per-source counts, predicted tokens, tokens that could be predicted) after each step, as
    one data-parallel rank alone consumes the stream."""
    import numpy as np

    from sctd_dist.data.dataset import PackedDataset
    from sctd_dist.data.loader import PretrainingDataLoader
    from sctd_dist.data.masking import MaskingConfig

    sets = [PackedDataset(folders["A"]), PackedDataset(folders["B"])]
    loader = PretrainingDataLoader(sets, global_batch_size=GLOBAL, micro_batch_size=2, dp_rank=0, dp_size=1,
                                   seed=1234, weights=[0.75, 0.25], names=[folders["A"], folders["B"]],
                                   masking=MaskingConfig(mlm_probability=mlm_probability))
    out = []
    for _ in range(steps):
        predicted = candidates = 0
        for b in next(loader):
            labelled = (b["labels"] >= 0).numpy()
            predicted += int(labelled.sum())
            candidates += int((labelled | ~np.isin(b["input_ids"].numpy(), sets[0].special_ids.all)).sum())
        out.append((loader.consumed_samples_by_source, predicted, candidates))
    return out


def test_blend_counts_lr_and_exact_restart(reference, folders):
    tmp, ref = reference
    assert sorted(ref) == list(range(STEPS))
    # every record carries the counts; they follow the weights and equal a DP=1 stream's
    assert [ref[s]["consumed_samples_by_source"] for s in range(STEPS)] == [
        counts for counts, _, _ in _dp1_stream(folders, STEPS)]
    final = ref[STEPS - 1]["consumed_samples_by_source"]
    assert abs(final[folders["A"]] / (STEPS * GLOBAL) - 0.75) < 0.02, final
    logs = tmp / "ref" / "logs"
    (start,) = launch.events(logs, "start")
    assert start["data_mixture"] == [[0.75, folders["A"]], [0.25, folders["B"]]]
    wraps = launch.events(logs, "data_epoch")  # B is smaller than its share of the run
    assert wraps and wraps[0]["source"] == folders["B"] and wraps[0]["epoch"] == 1
    # the WSD rate of each record (the rate set for the next update) is the formula's
    wsd = WSD(PEAK, 0.0, WARMUP, 1000, 20)
    assert all(abs(ref[s]["lr"] - wsd.lr(s + 1)) < 1e-12 for s in ref), [ref[s]["lr"] for s in range(6)]
    # stopped at step 20 and restarted: the uninterrupted losses, the same counts
    _copy_checkpoint(tmp / "ref" / "ckpt", HALF, tmp / "again" / "ckpt")
    _train(*_args(folders, tmp, "again"))
    got = _records(tmp / "again" / "logs")
    assert sorted(got) == list(range(HALF, STEPS))
    assert all(abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-6 for s in got)
    assert all(got[s]["consumed_samples_by_source"] == ref[s]["consumed_samples_by_source"] for s in got)
    (resume,) = launch.events(tmp / "again" / "logs", "resume")
    assert resume["consumed_samples_by_source"] == ref[HALF - 1]["consumed_samples_by_source"]


def test_tp2_checkpoint_resumed_at_tp1_dp2_keeps_per_source_counts(reference, folders, tmp_path):
    """Also at --mlm-probability 0.3: 30% of the tokens predicted, counted in every record."""
    _, ref = reference
    saved, end = 6, 12
    tp2 = ["--tensor-model-parallel-size", "2", "--mlm-probability", "0.3"]
    _train(*_args(folders, tmp_path, "job", *tp2, "--train-iters", str(saved)))
    # same folders, TP=1 x DP=2, on to step 12
    _train(*_args(folders, tmp_path, "job", "--mlm-probability", "0.3", "--train-iters", str(end)))
    logs = tmp_path / "job" / "logs"
    (moved,) = launch.events(logs, "layout_change")
    assert (moved["saved_tp_size"], moved["tp_size"], moved["dp_size"]) == (2, 1, 2)
    (resume,) = launch.events(logs, "resume")
    assert resume["consumed_samples_by_source"] == ref[saved - 1]["consumed_samples_by_source"]
    got = _records(logs)
    assert sorted(got) == list(range(end))
    assert all(got[s]["consumed_samples_by_source"] == ref[s]["consumed_samples_by_source"] for s in got)
    stream = _dp1_stream(folders, end, mlm_probability=0.3)
    assert [got[s]["masked_tokens"] for s in range(end)] == [p for _, p, _ in stream]
    rate = sum(p for _, p, _ in stream) / sum(c for _, _, c in stream)
    assert abs(rate - 0.3) < 0.02, rate  # ~6k candidate tokens: sampling noise ~0.006


def test_decay_branch_from_a_stable_checkpoint_restarts_exactly(reference, folders, tmp_path):
    tmp, ref = reference
    main = _copy_checkpoint(tmp / "ref" / "ckpt", HALF, tmp_path / "main")
    end = HALF + 8
    branch = ["--load", str(main), "--lr-decay-start", str(HALF), "--lr-wsd-decay-iters", "6",
              "--lr-wsd-decay-style", "cosine", "--train-iters", str(end), "--save-interval", "4"]
    _train(*_args(folders, tmp_path, "branch", *branch))
    got = _records(tmp_path / "branch" / "logs")
    assert sorted(got) == list(range(HALF, end))
    wsd = WSD(PEAK, 0.0, WARMUP, HALF, 6, "cosine")
    assert all(abs(got[s]["lr"] - wsd.lr(s + 1)) < 1e-12 for s in got)
    assert got[end - 1]["lr"] == 0.0 and got[HALF]["loss"] == ref[HALF]["loss"]  # same weights at 20
    assert sorted(p.name for p in main.iterdir()) == [checkpoint.tag_for(HALF), checkpoint.LATEST]
    # the branch killed after its step-24 save, rerun with the same command: it resumes its own
    # checkpoint (not the main run's) and decays on exactly as before
    _copy_checkpoint(tmp_path / "branch" / "ckpt", HALF + 4, tmp_path / "rerun" / "ckpt")
    _train(*_args(folders, tmp_path, "rerun", *branch))
    (resume,) = launch.events(tmp_path / "rerun" / "logs", "resume")
    assert resume["step"] == HALF + 4 and resume["lr_schedule"]["decay_start"] == HALF
    again = _records(tmp_path / "rerun" / "logs")
    assert sorted(again) == list(range(HALF + 4, end))
    assert all(abs(again[s]["loss"] - got[s]["loss"]) <= 1e-6 and again[s]["lr"] == got[s]["lr"] for s in again)


@pytest.mark.parametrize("case", ["short", "other"])
def test_a_blend_of_other_lengths_or_tokenizers_is_refused_in_one_line(folders, tmp_path, capsys, case):
    from sctd_dist.train import main

    code = main(["--data-path", "0.5", folders["A"], "0.5", folders[case], "--seq-length", str(SEQ),
                 "--log-dir", str(tmp_path / "logs"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --data-path: ")
    assert folders[case] in err
    assert ("sequences of 32 tokens" if case == "short" else "another tokenizer") in err
    assert not (tmp_path / "logs").exists()  # refused before any work
