"""Tokenizers for BERT pretraining: load or train one, identify it, and read its special ids.

The data pipeline only ever uses *fast* (Rust-backed) tokenizers: preparation encodes with the
`tokenizers` backend directly and training reloads the copy saved next to the shards.
Two facts about our tools shape this module:

* transformers 5 silently builds an all-[UNK] tokenizer from some constructor arguments, so every
  load is followed by a vocabulary-size check.
* `tokenizers`' WordPiece trainer is not deterministic (huggingface/tokenizers#1794: continuing
  sub-word pieces get ids in hash-map order and those ids break ties between merges). We pin the
  alphabet and pre-register its "##" pieces in sorted order, which makes training reproducible.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sctd_dist.special_tokens import SpecialTokenIds

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROLE_TO_ATTR = {"cls": "cls_token_id", "sep": "sep_token_id", "mask": "mask_token_id",
                 "pad": "pad_token_id", "unk": "unk_token_id"}
_ROLE_TO_TOKEN = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
WORDPIECE_PREFIX = "##"


def special_token_ids(tokenizer: Any, name: str = "tokenizer") -> SpecialTokenIds:
    """The [CLS]/[SEP]/[MASK]/[PAD]/[UNK] ids of a transformers tokenizer; ValueError if any is missing."""
    ids: dict[str, int] = {}
    missing = []
    for role, attr in _ROLE_TO_ATTR.items():
        value = getattr(tokenizer, attr, None)
        if value is None:
            missing.append(_ROLE_TO_TOKEN[role])
        else:
            ids[role] = int(value)
    if missing:
        raise ValueError(
            f"{name} has no {', '.join(missing)} token: BERT pretraining needs [CLS], [SEP], [MASK], "
            "[PAD] and [UNK]. Use a BERT-style WordPiece tokenizer (e.g. bert-base-uncased) or let "
            "prepare train one with --train-tokenizer VOCAB_SIZE."
        )
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"{name} maps two of [CLS]/[SEP]/[MASK]/[PAD]/[UNK] to the same id: {ids}")
    return SpecialTokenIds(**ids)


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; "
                         "the pipeline needs one (a folder with tokenizer.json, or a BERT vocab.txt)")
    return json.loads(backend.to_str())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token ids: vocabulary, normalizer, pre-tokenizer, added tokens.

    Post-processor, decoder and padding/truncation settings are left out: they do not change the
    ids of text, and transformers rewrites some of them on load.
    """
    spec = _backend_json(tokenizer)
    canonical = {
        "model": spec.get("model"),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "added_tokens": sorted((t["id"], t["content"], bool(t.get("special")))
                               for t in spec.get("added_tokens", [])),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_vocab_loaded(tokenizer: Any, name: str, directory: Path | None = None) -> None:
    """Guard against transformers silently building an empty ([UNK]-only) vocabulary."""
    size = len(tokenizer)
    if size <= len(SPECIAL_TOKENS):
        raise ValueError(f"{name} loaded with only {size} tokens: its vocabulary was not read. "
                         "Point --tokenizer at a folder with tokenizer.json (save_pretrained output).")
    if directory is not None and (directory / "vocab.txt").is_file():
        with open(directory / "vocab.txt", encoding="utf-8") as f:
            lines = sum(1 for line in f if line.rstrip("\n"))
        if size < lines:
            raise ValueError(f"{name} loaded {size} tokens but {directory / 'vocab.txt'} has {lines}: "
                             "the vocabulary file was not read")


def _from_bert_vocab(folder: Path) -> Any:
    """A fast BERT tokenizer from a bare vocab.txt (the original Google BERT release format).

    Passed as a dict: transformers 5 ignores `vocab_file=` and would build an all-[UNK] tokenizer.
    """
    from transformers import BertTokenizerFast

    with open(folder / "vocab.txt", encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f if line.rstrip("\n")]
    lower = True
    config = folder / "tokenizer_config.json"
    if config.is_file():
        lower = bool(json.loads(config.read_text()).get("do_lower_case", True))
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=lower)


def load_pretrained_tokenizer(name_or_dir: str | Path, *, local_only: bool = False) -> Any:
    """A fast transformers tokenizer from a folder or a hub name, validated for BERT pretraining."""
    from transformers import AutoTokenizer

    path = Path(name_or_dir).expanduser()
    is_dir = path.is_dir()
    if not is_dir and (local_only or str(name_or_dir).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"tokenizer folder {name_or_dir} does not exist")
    source = str(path) if is_dir else str(name_or_dir)
    try:
        if is_dir and not (path / "tokenizer.json").is_file() and (path / "vocab.txt").is_file():
            tok = _from_bert_vocab(path)
        else:
            tok = AutoTokenizer.from_pretrained(source, use_fast=True)
    except OSError as err:
        raise ValueError(f"cannot load tokenizer {name_or_dir!r}: {err}. Pass a local folder "
                         "(save_pretrained output) when offline.") from err
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_dir!r} is not a fast tokenizer; save it with "
                         "tokenizer.json (transformers' save_pretrained of a fast tokenizer)")
    check_vocab_loaded(tok, f"tokenizer {name_or_dir!r}", path if is_dir else None)
    special_token_ids(tok, f"tokenizer {name_or_dir!r}")
    return tok


def _alphabet(texts: Iterable[str], normalizer: Any, limit: int) -> list[str]:
    """The `limit` most frequent characters after normalisation (ties broken by the character)."""
    counts: Counter[str] = Counter()
    for text in texts:
        if text:
            counts.update(normalizer.normalize_str(text))
    chars = [c for c in counts if not c.isspace()]
    chars.sort(key=lambda c: (-counts[c], c))
    return sorted(chars[:limit])


def train_wordpiece_tokenizer(
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
    model_max_length: int = 512,
) -> Any:
    """Train a BERT WordPiece tokenizer (deterministically) and wrap it as a transformers tokenizer.

    `texts` is called twice (alphabet pass, training pass) and must yield the same texts each time.
    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    if vocab_size < 64:
        raise ValueError(f"--train-tokenizer vocabulary size {vocab_size} is too small (use >= 64)")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None, lowercase=lowercase)
    alphabet = _alphabet(texts(), normalizer, limit_alphabet)
    if not alphabet:
        raise ValueError("cannot train a tokenizer: the corpus has no text")
    # Pre-registering every "##c" piece in sorted order fixes their ids (see module docstring).
    seeded = list(SPECIAL_TOKENS) + [WORDPIECE_PREFIX + c for c in alphabet]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=seeded, initial_alphabet=alphabet, limit_alphabet=len(alphabet),
        continuing_subword_prefix=WORDPIECE_PREFIX,
    )
    tok.train_from_iterator(texts(), trainer=trainer)

    # Rebuild from the learned vocabulary so only the five real special tokens are "special".
    vocab = tok.get_vocab()
    final = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                       continuing_subword_prefix=WORDPIECE_PREFIX))
    final.normalizer = normalizer
    final.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    final.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    final.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    final.add_special_tokens(list(SPECIAL_TOKENS))
    wrapped = BertTokenizerFast(
        tokenizer_object=final, do_lower_case=lowercase, model_max_length=model_max_length,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )
    if len(wrapped) != len(vocab):
        raise RuntimeError(f"wrapped tokenizer has {len(wrapped)} tokens, trained vocabulary {len(vocab)}")
    return wrapped


def word_start_table(tokenizer: Any) -> np.ndarray:
    """bool per token id: True when the token begins a word (WordPiece: no "##" prefix).

    Used for whole-word masking; only WordPiece vocabularies mark word continuations this way.
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"whole-word masking needs a WordPiece tokenizer, this one is {model.get('type')}; "
                         "disable whole_word_masking")
    prefix = model.get("continuing_subword_prefix") or WORDPIECE_PREFIX
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size(True)
    table = np.ones(size, dtype=bool)
    for token, idx in tokenizer.get_vocab().items():
        if token.startswith(prefix) and idx < size:
            table[idx] = False
    return table
