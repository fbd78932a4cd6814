"""Tokenizer training, identity and the special-token contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sctd_dist.data.tokenizer import (
    load_pretrained_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
    train_wordpiece_tokenizer,
    word_start_table,
)


def test_training_is_deterministic(small_texts: list[str]) -> None:
    # tokenizers' own WordPiece trainer gives different vocabularies run to run (issue #1794)
    a = train_wordpiece_tokenizer(lambda: iter(small_texts), 1500)
    b = train_wordpiece_tokenizer(lambda: iter(small_texts), 1500)
    assert a.get_vocab() == b.get_vocab()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert len(a) == 1500


def test_trained_tokenizer_is_a_bert_tokenizer(hf_tokenizer, tokenizer_dir: Path) -> None:
    ids = special_token_ids(hf_tokenizer)
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (0, 1, 2, 3, 4)
    enc = hf_tokenizer("Returns the tensor.")["input_ids"]
    assert enc[0] == ids.cls and enc[-1] == ids.sep and ids.unk not in enc
    assert hf_tokenizer.tokenize("Tensor") == ["tensor"]  # uncased
    # the fingerprint survives save_pretrained / from_pretrained
    reloaded = load_pretrained_tokenizer(tokenizer_dir)
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(hf_tokenizer)


def test_fingerprint_tells_tokenizers_apart(hf_tokenizer, small_texts: list[str]) -> None:
    other = train_wordpiece_tokenizer(lambda: iter(small_texts), 1999)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(hf_tokenizer)


def test_missing_special_token_is_an_error(tmp_path: Path) -> None:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(50)])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]")
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"no \[MASK\] token"):
        load_pretrained_tokenizer(tmp_path)


def test_bare_bert_vocab_txt_is_read(tmp_path: Path) -> None:
    # transformers 5 silently ignores BertTokenizerFast(vocab_file=...): every id would be [UNK]
    words = [f"tok{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = load_pretrained_tokenizer(tmp_path)
    assert len(tok) == 45
    assert tok("tok7 tok39", add_special_tokens=False)["input_ids"] == [12, 44]
    assert special_token_ids(tok).mask == 4


def test_word_starts(hf_tokenizer) -> None:
    table = word_start_table(hf_tokenizer)
    vocab = hf_tokenizer.get_vocab()
    assert table.shape == (len(hf_tokenizer),)
    for token, idx in vocab.items():
        assert table[idx] == (not token.startswith("##"))
    assert not table.all() and table.any()
    # a word split into pieces: the first piece starts the word, the others continue it
    ids = hf_tokenizer("unbelievably", add_special_tokens=False)["input_ids"]
    assert table[ids[0]] and not np.any(table[ids[1:]])


def test_missing_tokenizer_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_pretrained_tokenizer(tmp_path / "nope", local_only=True)
