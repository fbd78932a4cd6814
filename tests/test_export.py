"""A TP=2, ZeRO-3 checkpoint exports to a Hugging Face folder that computes our eval loss."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.training import launch

from tests.conftest import SEQ
EVAL_ITERS = 3


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A 4-step TP=2 ZeRO-3 run with its checkpoint and logs."""
    tmp_path = tmp_path_factory.mktemp("export")
    config = launch.fp32_config("zero3_bf16.json", tmp_path / "zero3_fp32.json")
    launch.train(2, "--deepspeed_config", str(config), "--data-path", str(data_dir),
                 "--seq-length", str(SEQ), "--tensor-model-parallel-size", "2", "--token-drop", "sctd",
                 "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2",
                 "--eval-interval", "4", "--eval-iters", str(EVAL_ITERS), "--save",
                 str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "logs"), "--no-progress")
    return tmp_path


def test_export_reproduces_our_evaluation_loss(trained, data_dir, tmp_path):
    from transformers import AutoTokenizer, BertForMaskedLM

    from sctd_dist.data.dataset import PackedDataset
    from sctd_dist.data.loader import ValidationDataLoader
    from sctd_dist.export import main as export_main

    ours = [json.loads(l) for l in (trained / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in ours if "eval_loss" in r and "event" not in r]
    eval_loss = evals[-1]["eval_loss"]
    # With ScTD on, evaluation also reports the [CLS] drift of the dropping path.
    assert 0.0 < evals[-1]["eval_cls_cosine"] < 1.0 and -1.0 <= evals[-1]["eval_cls_cosine_centered"] < 1.0

    assert export_main(["--checkpoint", str(trained / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    model = BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tokenizer) == model.config.vocab_size

    # The same validation batches our evaluation used (one data-parallel rank at TP=2).
    loader = ValidationDataLoader(PackedDataset(data_dir, "validation"), micro_batch_size=2,
                                  dp_rank=0, dp_size=1, seed=1234)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(EVAL_ITERS):
            batch = loader.batch(i)
            n = int((batch["labels"] >= 0).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], labels=batch["labels"])
            total += out.loss.item() * n
            count += n
    assert abs(total / count - eval_loss) <= 1e-5 * max(1.0, abs(eval_loss))


def test_export_of_a_read_only_checkpoint_from_elsewhere(trained, tmp_path, monkeypatch, capsys):
    """The checkpoint on a read-only mount, export run from another working directory, into a
    folder that holds an older export: refused without --overwrite, replaced whole with it."""
    from sctd_dist.export import main as export_main

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(trained / "ckpt"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        out = tmp_path / "hf"
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "pytorch_model.bin").write_bytes(b"stale")
        monkeypatch.chdir(tmp_path)
        assert export_main(["--checkpoint", str(ro), "--out", str(out)]) == 2
        assert "is not empty; choose a new folder, or pass --overwrite" in capsys.readouterr().err
        assert export_main(["--checkpoint", str(ro), "--out", str(out), "--overwrite"]) == 0
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    files = sorted(p.name for p in out.iterdir())
    assert "pytorch_model.bin" not in files and "model.safetensors" in files
    assert "tokenizer.json" in files or "vocab.txt" in files  # the run's data folder was found
