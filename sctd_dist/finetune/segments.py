"""Segment B (token type 1) at fine-tuning time.

Pretraining here feeds segment A only (token type 0), so the token-type-1 row of an sctd-dist
model is still its random initialisation, while every pair task (and SQuAD's context) is fed as
segment B. Unless told otherwise (`--segment-b copy|keep`), fine-tuning starts that row from the
trained segment-A row when the pretraining never trained it. Whether it did is read from the
model folder: a `segment_b_trained` entry of its config.json or run record (sctd_run.json) when
it is true or false; else an sctd-dist run record of a run not started from another model's
weights (`--init-hf`) means the pretraining fed segment A only; anything else (another trainer's
export, a run continued from one) is judged by its weights: an untouched row 1 still has the
standard deviation it was initialised with (`initializer_range`) and no mean of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

RECORD_KEY = "segment_b_trained"
RUN_FILE = "sctd_run.json"
STD_TOLERANCE = 0.1  # relative distance to initializer_range still called "at its initialisation"


@dataclass
class SegmentDecision:
    """Whether segment B was trained, how that was found out, and what fine-tuning does."""

    trained: bool | None  # None: the model has no segment B row at all
    decided_by: str
    copy: bool

    def describe(self) -> str:
        if self.trained is None:
            return f"segment B: {self.decided_by}"
        state = "trained" if self.trained else "never trained"
        action = "initialised from segment A" if self.copy else "kept as stored"
        return f"segment B (token type 1) {state} ({self.decided_by}): {action}"

    def to_dict(self) -> dict:
        return {"trained": self.trained, "decided_by": self.decided_by, "copied_from_segment_a": self.copy}


def _recorded(folder: Path) -> tuple[bool | None, str]:
    """(trained?, where that is written) from the folder's config or run record; None: unrecorded."""
    for name in ("config.json", RUN_FILE):
        path = folder / name
        if path.is_file():
            record = json.loads(path.read_text())
            if isinstance(record.get(RECORD_KEY), bool):
                return record[RECORD_KEY], f"{RECORD_KEY} in {name}"
    run = folder / RUN_FILE
    if run.is_file() and RECORD_KEY not in (record := json.loads(run.read_text())) \
            and not (record.get("train_config") or {}).get("init_hf"):
        return False, f"{RUN_FILE}: sctd-dist pretraining feeds segment A only"
    return None, ""


def looks_untrained(rows: torch.Tensor, initializer_range: float) -> bool:
    """Row 1 of a token-type table still as drawn from N(0, initializer_range^2)."""
    row = rows[1].double()
    std, mean = float(row.std()), float(row.mean())
    return abs(std / initializer_range - 1.0) < STD_TOLERANCE and abs(mean) < 4 * std / row.numel() ** 0.5


def decide(folder: Path, stored: dict[str, torch.Tensor], mode: str) -> SegmentDecision:
    """What to do with segment B of the model in `folder` (`mode`: auto, copy or keep)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    rows = next((v for k, v in stored.items() if k.endswith("token_type_embeddings.weight")), None)
    if rows is None or rows.shape[0] < 2:
        return SegmentDecision(None, "the model has no token type 1", False)
    trained, where = _recorded(Path(folder))
    if trained is None:
        trained = not looks_untrained(rows, float(config.get("initializer_range", 0.02)))
        where = f"not recorded; row 1 {'differs from' if trained else 'is still at'} its initialisation"
    copy = {"auto": not trained, "copy": True, "keep": False}[mode]
    return SegmentDecision(trained, where + ("" if mode == "auto" else f"; --segment-b {mode}"), copy)


def copy_segment_a(model: torch.nn.Module) -> None:
    """Token type 1's embedding := token type 0's."""
    with torch.no_grad():
        table = model.bert.embeddings.token_type_embeddings.weight
        table[1].copy_(table[0])
