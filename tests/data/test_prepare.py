"""prepare: round trip, splits, parallel = serial, resumability, input types, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sctd_dist.data.dataset import PackedDataset, load_tokenizer, read_metadata
from sctd_dist.data.packing import is_validation_document
from sctd_dist.data.prepare import prepare_corpus
from sctd_dist.data.sample_cache import ensure_sample_dataset
from tests.data.conftest import SEQ
from tests.data.helpers import assert_row_layout, flat, reference_ids, strip_specials

LONG_DOC = "The quick brown fox jumps over the lazy dog while the tensor is reshaped. " * 40
TRICKY = "Literal special tokens such as [SEP], [CLS], [MASK] and [PAD] are ordinary text here."


def _texts(small_texts: list[str]) -> list[str]:
    """Real prose plus the edge cases: literal special tokens, an empty line, a long document."""
    return small_texts[:120] + [TRICKY, "", LONG_DOC] + small_texts[120:200]


def _write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def _prepare(inputs, out, tokenizer_dir, hf_cache, **kw) -> Path:
    kw.setdefault("validation_fraction", 0.0)
    return prepare_corpus([str(i) for i in inputs], out, SEQ, tokenizer=str(tokenizer_dir),
                          datasets_cache_dir=hf_cache, progress=False, **kw)


def _all_rows(out: Path, split: str = "train") -> np.ndarray:
    ds = PackedDataset(out, split)
    return ds.get_rows(np.arange(len(ds)))


def test_round_trip(tmp_path, small_texts, tokenizer_dir, hf_tokenizer, hf_cache) -> None:
    texts = _texts(small_texts)
    out = _prepare([_write_txt(tmp_path / "c.txt", texts)], tmp_path / "out", tokenizer_dir, hf_cache,
                   shard_bytes=8_000)
    meta = read_metadata(out)
    ids = meta["tokenizer"]["special_ids"]
    rows = _all_rows(out)
    assert meta["num_shards"] > 1 and meta["dtype"] == "uint16"
    assert_row_layout(rows, ids["cls"], ids["sep"], ids["pad"])
    expected = flat(reference_ids(hf_tokenizer, texts))
    np.testing.assert_array_equal(strip_specials(rows, ids["cls"], ids["sep"], ids["pad"]), expected)
    assert meta["splits"]["train"]["num_tokens"] == expected.size
    assert meta["splits"]["train"]["num_documents"] == len(texts) - 1  # the empty line is no document
    assert meta["splits"]["validation"]["num_sequences"] == 0
    # padding only where a shard ends (plus rare one-slot gaps)
    pads = (rows == ids["pad"]).sum(1)
    assert meta["splits"]["train"]["num_padding"] == int(pads.sum())
    shard_ends = np.cumsum([s["num_sequences"] for s in meta["splits"]["train"]["shards"]]) - 1
    inner = np.delete(pads, shard_ends)
    assert inner.max() <= 1 and inner.mean() < 0.1


def test_validation_split_holds_exactly_the_drawn_documents(tmp_path, small_texts, tokenizer_dir,
                                                            hf_tokenizer, hf_cache) -> None:
    texts = _texts(small_texts)
    out = _prepare([_write_txt(tmp_path / "c.txt", texts)], tmp_path / "out", tokenizer_dir, hf_cache,
                   validation_fraction=0.3, seed=11)
    held = is_validation_document(np.arange(len(texts)), 0.3, seed=11)
    ids = read_metadata(out)["tokenizer"]["special_ids"]
    for split, docs in (("train", [t for t, h in zip(texts, held) if not h]),
                        ("validation", [t for t, h in zip(texts, held) if h])):
        got = strip_specials(_all_rows(out, split), ids["cls"], ids["sep"], ids["pad"])
        np.testing.assert_array_equal(got, flat(reference_ids(hf_tokenizer, docs)))


def test_parallel_equals_serial(tmp_path, small_corpus, tokenizer_dir, hf_cache) -> None:
    a = _prepare([small_corpus], tmp_path / "one", tokenizer_dir, hf_cache, num_proc=1,
                 validation_fraction=0.1, shard_bytes=20_000)
    b = _prepare([small_corpus], tmp_path / "two", tokenizer_dir, hf_cache, num_proc=2,
                 validation_fraction=0.1, shard_bytes=20_000)
    meta_a, meta_b = read_metadata(a), read_metadata(b)
    assert meta_a["num_shards"] >= 4
    assert meta_a["splits"] == meta_b["splits"]
    for name in sorted(p.name for p in a.glob("*.bin")):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rerun_skips_finished_shards(tmp_path, small_corpus, tokenizer_dir, hf_cache) -> None:
    out = _prepare([small_corpus], tmp_path / "out", tokenizer_dir, hf_cache, shard_bytes=20_000)
    bins = sorted(out.glob("train-*.bin"))
    assert len(bins) >= 4
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in bins}
    time.sleep(0.01)
    _prepare([small_corpus], out, tokenizer_dir, hf_cache, shard_bytes=20_000)  # complete: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in bins} == {k: v[0] for k, v in before.items()}

    # an interrupted run: metadata never written, one shard lost -> only that shard is redone
    (out / "metadata.json").unlink()
    bins[2].unlink()
    _prepare([small_corpus], out, tokenizer_dir, hf_cache, shard_bytes=20_000)
    for p in bins:
        assert p.read_bytes() == before[p.name][1]
        if p != bins[2]:
            assert p.stat().st_mtime_ns == before[p.name][0], f"{p.name} was rewritten"
    assert read_metadata(out)["splits"]["train"]["num_sequences"] == len(PackedDataset(out))


@pytest.mark.parametrize("kind", ["txt", "txt_paragraphs", "jsonl", "parquet", "save_to_disk", "folder"])
def test_input_types(kind, tmp_path, small_texts, tokenizer_dir, hf_tokenizer, hf_cache) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = small_texts[:60]
    src = tmp_path / "src"
    src.mkdir()
    options = {}
    if kind == "txt":
        inputs = [_write_txt(src / "a.txt", texts)]
    elif kind == "txt_paragraphs":  # documents of several lines, separated by blank lines
        texts = [texts[i] + "\n" + texts[i + 1] for i in range(0, 60, 2)]
        (src / "a.txt").write_text("\n\n".join(texts) + "\n")
        inputs, options = [src / "a.txt"], {"text_sample_by": "paragraph"}
    elif kind == "jsonl":
        (src / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        inputs = [src / "a.jsonl"]
    elif kind == "parquet":  # the only string column is found without --text-column
        pq.write_table(pa.table({"n": list(range(len(texts))), "content": texts}), src / "a.parquet")
        inputs = [src / "a.parquet"]
    elif kind == "save_to_disk":
        datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(src / "ds"))
        inputs = [src / "ds"]
    else:  # a folder of files, read in sorted order
        _write_txt(src / "b.txt", texts[30:])
        _write_txt(src / "a.txt", texts[:30])
        inputs = [src]
    out = _prepare(inputs, tmp_path / "out", tokenizer_dir, hf_cache, **options)
    meta = read_metadata(out)
    ids = meta["tokenizer"]["special_ids"]
    got = strip_specials(_all_rows(out), ids["cls"], ids["sep"], ids["pad"])
    np.testing.assert_array_equal(got, flat(reference_ids(hf_tokenizer, texts)))
    assert meta["splits"]["train"]["num_documents"] == len(texts)


def test_several_inputs_keep_their_order(tmp_path, small_texts, tokenizer_dir, hf_tokenizer, hf_cache) -> None:
    a = _write_txt(tmp_path / "z.txt", small_texts[:20])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts[20:45]))
    out = _prepare([a, b], tmp_path / "out", tokenizer_dir, hf_cache)
    ids = read_metadata(out)["tokenizer"]["special_ids"]
    got = strip_specials(_all_rows(out), ids["cls"], ids["sep"], ids["pad"])
    np.testing.assert_array_equal(got, flat(reference_ids(hf_tokenizer, small_texts[:45])))
    assert [s["type"] for s in read_metadata(out)["sources"]] == ["text", "json"]


def test_large_vocabulary_uses_int32(tmp_path, hf_cache) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(70_000)]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = BertTokenizerFast(tokenizer_object=backend)
    tok.save_pretrained(str(tmp_path / "tok"))
    texts = ["w69999 w3 w65536 w70000", "w65535 w1"]
    out = _prepare([_write_txt(tmp_path / "c.txt", texts)], tmp_path / "out", tmp_path / "tok", hf_cache)
    meta = read_metadata(out)
    assert meta["dtype"] == "int32" and meta["vocab_size"] == 70_005
    row = PackedDataset(out)[0]
    expected = [2, 70004, 8, 65541, 1, 3, 65540, 6, 3]  # w70000 is unknown -> [UNK]
    assert row[:9].tolist() == expected and (row[9:] == 0).all()


# ----------------------------------------------------------------------------- errors

def test_empty_corpus(tmp_path, tokenizer_dir, hf_cache) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        _prepare([empty], tmp_path / "a", tokenizer_dir, hf_cache)
    blank = _write_txt(tmp_path / "blank.txt", ["", "   ", "\t"])
    with pytest.raises(ValueError, match="empty corpus"):
        _prepare([blank], tmp_path / "b", tokenizer_dir, hf_cache)
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus([str(empty)], tmp_path / "c", SEQ, train_tokenizer_vocab=500,
                       datasets_cache_dir=hf_cache, progress=False)
    assert not (tmp_path / "b" / "metadata.json").exists()


def test_missing_input(tmp_path, tokenizer_dir, hf_cache) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prepare([tmp_path / "nope.txt"], tmp_path / "out", tokenizer_dir, hf_cache)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        _prepare([tmp_path / "emptydir"], tmp_path / "out", tokenizer_dir, hf_cache)
    with pytest.raises(FileNotFoundError, match="Hub"):  # offline: a hub name fails with a clear message
        _prepare(["no-such-org/no-such-dataset"], tmp_path / "out", tokenizer_dir, hf_cache)


def test_tokenizer_without_mask_token(tmp_path, small_corpus, hf_cache) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "of"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        _prepare([small_corpus], tmp_path / "out", tmp_path / "tok", hf_cache)


def test_sequence_longer_than_model_positions(tmp_path, small_corpus, tokenizer_dir, hf_cache) -> None:
    with pytest.raises(ValueError, match="position"):
        _prepare([small_corpus], tmp_path / "a", tokenizer_dir, hf_cache, max_position_embeddings=32)
    model_dir = tmp_path / "model"  # a model folder: its config.json sets the limit
    model_dir.mkdir()
    for f in tokenizer_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 48}))
    with pytest.raises(ValueError, match="48"):
        _prepare([small_corpus], tmp_path / "b", model_dir, hf_cache)
    # Training's own check of rows against a model: tests/model/test_config.py (check_seq_length).


def test_folder_made_with_another_tokenizer(tmp_path, small_corpus, small_texts, tokenizer_dir, hf_cache,
                                            prepared) -> None:
    from sctd_dist.data.tokenizer import train_wordpiece_tokenizer

    other = tmp_path / "other_tok"
    train_wordpiece_tokenizer(lambda: iter(small_texts), 1000).save_pretrained(str(other))
    with pytest.raises(ValueError, match="another tokenizer"):
        _prepare([small_corpus], prepared, other, hf_cache, validation_fraction=0.1, seed=7, shard_bytes=40_000)
    with pytest.raises(ValueError, match="another tokenizer"):
        prepare_corpus([str(small_corpus)], prepared, SEQ, train_tokenizer_vocab=1000,
                       datasets_cache_dir=hf_cache, progress=False)
    # Training refuses a model vocabulary smaller than the data's tokenizer (sctd_dist.run).
    from sctd_dist.arguments import TrainConfig
    from sctd_dist.run import model_config

    model_cfg = tmp_path / "small_vocab.json"
    model_cfg.write_text(json.dumps({"vocab_size": 1000}))
    vocab = json.loads((prepared / "metadata.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size 1000 of the model is smaller than the tokenizer's"):
        model_config(TrainConfig(model_config=model_cfg, seq_length=SEQ), vocab, prepared)


def test_rerun_after_a_kill_right_after_the_tokenizer_was_saved(tmp_path, small_corpus, hf_cache) -> None:
    def prepare(out):
        return prepare_corpus([str(small_corpus)], out, SEQ, train_tokenizer_vocab=500,
                              datasets_cache_dir=hf_cache, progress=False, validation_fraction=0.1)

    out = prepare(tmp_path / "out")
    meta = read_metadata(out)
    rows = _all_rows(out)
    # The folder as a kill right after tokenizer/ was written leaves it: nothing else yet.
    for p in out.iterdir():
        if p.name != "tokenizer":
            p.unlink()
    (out / "tokenizer" / "tokenizer.json").write_text('{"half": ')  # and cut mid-file
    prepare(out)
    assert read_metadata(out)["tokenizer"]["fingerprint"] == meta["tokenizer"]["fingerprint"]
    assert np.array_equal(_all_rows(out), rows)


def test_cli_trains_tokenizer_and_reports_errors(tmp_path, small_corpus, hf_cache) -> None:
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache)}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sctd_dist.data.prepare", "--input", str(small_corpus), "--train-tokenizer",
           "800", "--seq-length", "32", "--out", str(out), "--num-proc", "2", "--validation-fraction", "0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(out)
    assert meta["seq_length"] == 32 and meta["vocab_size"] == 800
    assert meta["tokenizer"]["trained"]["vocab_size"] == 800
    assert meta["splits"]["validation"]["num_sequences"] > 0
    tok = load_tokenizer(out)  # training needs nothing but the folder
    assert len(tok) == 800 and tok.mask_token_id == meta["tokenizer"]["special_ids"]["mask"]
    assert "prepare" in proc.stderr  # the progress bar

    bad = subprocess.run([sys.executable, "-m", "sctd_dist.data.prepare", "--input", str(tmp_path / "missing.txt"),
                          "--train-tokenizer", "800", "--seq-length", "32", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_sample_dataset_is_built_once_and_fast(tmp_path) -> None:
    t0 = time.perf_counter()
    out = ensure_sample_dataset(tmp_path, seq_length=128, vocab_size=8192)
    first = time.perf_counter() - t0
    meta = read_metadata(out)
    assert meta["seq_length"] == 128 and meta["vocab_size"] == 8192
    assert meta["splits"]["train"]["num_tokens"] > 400_000 and meta["splits"]["validation"]["num_sequences"] > 10
    assert first < 60, f"building the sample dataset took {first:.1f}s"
    t0 = time.perf_counter()
    assert ensure_sample_dataset(tmp_path, seq_length=128, vocab_size=8192) == out
    assert time.perf_counter() - t0 < 2.0
    assert len(load_tokenizer(out)) == 8192


def test_cli_flags_come_from_one_declaration(tmp_path, capsys) -> None:
    from sctd_dist.data.prepare import PrepareConfig, build_parser, main
    from sctd_dist.flags import from_flags

    cfg = from_flags(PrepareConfig, build_parser().parse_args(
        ["--input", "a.txt", "b.jsonl", "--seq-length", "64", "--out", "o", "--no-progress"]))
    assert cfg.input == ["a.txt", "b.jsonl"] and cfg.seq_length == 64 and cfg.progress is False
    with pytest.raises(SystemExit) as exc:  # a required flag missing: argparse's one line
        main(["--input", "a.txt", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--seq-length" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--input", "a.txt", "--seq-length", "64", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "give exactly one of --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any file was written
