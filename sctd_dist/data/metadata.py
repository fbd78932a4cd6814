"""The metadata of a prepared folder (`metadata.json`, written last: the folder is complete), and
the refusal to mix a preparation into a folder made with other settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sctd_dist.documents import BOUNDARY_RECORD

from .corpus_tokenizer import tokenizer_mismatch
from .dataset import FORMAT, FORMAT_VERSION, METADATA_FILE, TOKENIZER_DIR
from .shard_plan import ShardTask, digest
from .shard_worker import SPLITS


def check_existing(out: Path, plan: str, settings: dict) -> None:
    """Refuse to mix a new preparation into a folder holding one with other settings."""
    old: dict | None = None
    if (out / METADATA_FILE).is_file():
        old = json.loads((out / METADATA_FILE).read_text()).get("settings")
    else:
        for marker in sorted(out.glob("shard-*.json"))[:1]:
            plan_old = json.loads(marker.read_text()).get("plan")
            if plan_old != plan:
                raise ValueError(f"{out} holds an unfinished preparation with other inputs or settings; "
                                 "use a new --out folder or delete it")
    if old is not None and digest(old) != plan:
        changed = sorted(k for k in settings if settings.get(k) != old.get(k))
        if "tokenizer_fingerprint" in changed:
            raise tokenizer_mismatch(out, old.get("tokenizer_fingerprint"), "recorded in metadata.json",
                                      settings["tokenizer_fingerprint"], "the requested tokenizer")
        raise ValueError(f"{out} was prepared with other settings ({', '.join(changed)} differ); "
                         "use a new --out folder or delete it")


def build_metadata(out: Path, settings: dict, plan: str, records: dict[int, dict], tasks: list[ShardTask],
              tok_desc: str, fingerprint: str, specials: Any, vocab_size: int, training: dict | None,
              inputs: list[str]) -> dict:
    import datasets as hf_datasets
    import tokenizers

    from .. import __version__

    splits: dict[str, dict] = {}
    for split in SPLITS:
        shards = [records[t.index][split] for t in tasks]
        splits[split] = {
            "num_sequences": sum(s["num_sequences"] for s in shards),
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "num_padding": sum(s["num_padding"] for s in shards),
            "shards": [s for s in shards if s["num_sequences"] > 0],
        }
    if splits["train"]["num_tokens"] == 0:
        if splits["validation"]["num_tokens"] > 0:
            raise ValueError("every document went to the validation split; lower --validation-fraction")
        raise ValueError(f"empty corpus: the inputs {inputs} hold no text that tokenizes to anything")
    seq = settings["seq_length"]
    for s in splits.values():
        s["padding_fraction"] = round(s["num_padding"] / max(1, s["num_sequences"] * seq), 6)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_length": seq,
        "dtype": settings["dtype"],
        "vocab_size": vocab_size,
        "tokenizer": {"dir": TOKENIZER_DIR, "source": tok_desc, "fingerprint": fingerprint,
                      "special_ids": specials.to_dict(), "trained": training},
        "packing": "rows of [CLS] tokens [SEP]; documents separated by [SEP] and continued across "
                   "rows; [PAD] only at the end of a shard; no NSP",
        "document_boundaries": BOUNDARY_RECORD,
        "inputs": inputs,
        "sources": settings["sources"],
        "validation_fraction": settings["validation_fraction"],
        "seed": settings["seed"],
        "num_shards": len(tasks),
        "splits": splits,
        "plan": plan,
        "settings": settings,
        "created_with": {"sctd_dist": __version__, "tokenizers": tokenizers.__version__,
                         "datasets": hf_datasets.__version__, "numpy": np.__version__},
    }
