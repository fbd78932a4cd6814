"""GLUE and SQuAD read by name from their official files (`--data-dir DIR`).

GLUE as its distribution unpacks: DIR/CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI, each
with train.tsv and dev.tsv (MNLI: dev_matched.tsv and dev_mismatched.tsv). Every file is
tab-separated and read with no quoting (its sentences contain unbalanced quotes); CoLA has no
header, the others name their columns in the first line. SQuAD: DIR/train-v1.1.json and
dev-v1.1.json (`squad`), DIR/train-v2.0.json and dev-v2.0.json (`squad_v2`).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAG = "--data-dir"
# A line without the fields its header names is skipped (the reference processors skip them too)
# while such lines stay rare; more than this fraction means the file is not what it claims.
MAX_SKIPPED_FRACTION = 0.001


@dataclass(frozen=True)
class GlueLayout:
    """Where one GLUE task's columns are in its official files."""

    folder: str
    text: tuple[str | int, ...]  # header names, or positions in a file without a header
    label: str | int
    labels: tuple[str, ...] | None  # classification: the label values as written; None: regression
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    header: bool = True
    width: int | None = None  # fields per line of a header-less file


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
GLUE_LAYOUTS: dict[str, GlueLayout] = {
    "cola": GlueLayout("CoLA", (3,), 1, _BINARY, header=False, width=4),
    "sst2": GlueLayout("SST-2", ("sentence",), "label", _BINARY),
    "mrpc": GlueLayout("MRPC", ("#1 String", "#2 String"), "Quality", _BINARY),
    "qqp": GlueLayout("QQP", ("question1", "question2"), "is_duplicate", _BINARY),
    "stsb": GlueLayout("STS-B", ("sentence1", "sentence2"), "score", None),
    "mnli": GlueLayout("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                       eval_files={"validation_matched": "dev_matched.tsv",
                                   "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": GlueLayout("QNLI", ("question", "sentence"), "label", _ENTAILMENT),
    "rte": GlueLayout("RTE", ("sentence1", "sentence2"), "label", _ENTAILMENT),
    "wnli": GlueLayout("WNLI", ("sentence1", "sentence2"), "label", _BINARY),
}
SQUAD_FILES = {"squad": ("train-v1.1.json", "dev-v1.1.json"), "squad_v2": ("train-v2.0.json", "dev-v2.0.json")}


def _positions(layout: GlueLayout, header: list[str] | None, path: Path) -> tuple[list[int], int]:
    """Positions of the text columns and of the label in each line."""
    wanted = [*layout.text, layout.label]
    if header is None:
        return [int(c) for c in layout.text], int(layout.label)
    absent = [c for c in wanted if c not in header]
    if absent:
        raise ValueError(f"{FLAG}: {path} has columns {header}, missing {absent}: is it the official GLUE file?")
    return [header.index(str(c)) for c in layout.text], header.index(str(layout.label))


def _label(value: str, layout: GlueLayout, path: Path, line: int) -> Any:
    column = layout.label if isinstance(layout.label, str) else f"#{layout.label + 1}"
    if layout.labels is None:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number != number:
            raise ValueError(f"{FLAG}: {path} line {line} column {column}: {value!r} is not a number")
        return number
    if value not in layout.labels:
        raise ValueError(f"{FLAG}: {path} line {line} column {column}: label {value!r} is not one of "
                         f"{list(layout.labels)}")
    return value


def read_glue_file(path: Path, layout: GlueLayout) -> tuple[dict[str, list], int]:
    """{sentence1, [sentence2,] label} columns of one official file, and the lines skipped."""
    if not path.is_file():
        raise ValueError(f"{FLAG}: {path} does not exist (expected the official GLUE layout: "
                         f"{FLAG}/{layout.folder}/ with train.tsv, {', '.join(layout.eval_files.values())})")
    csv.field_size_limit(sys.maxsize)  # a few lines of the official files hold very long fields
    with open(path, encoding="utf-8", newline="") as f:
        lines = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(lines, None) if layout.header else None
        text_at, label_at = _positions(layout, header, path)
        width = len(header) if header is not None else layout.width
        needed = max(*text_at, label_at) + 1
        columns: dict[str, list] = {f"sentence{i + 1}": [] for i in range(len(text_at))}
        columns["label"] = []
        skipped, total = 0, 0
        for number, row in enumerate(lines, start=2 if layout.header else 1):
            if not row:
                continue
            total += 1
            if len(row) < needed:
                skipped += 1
                continue
            for i, at in enumerate(text_at):
                columns[f"sentence{i + 1}"].append(row[at])
            columns["label"].append(_label(row[label_at], layout, path, number))
    if not columns["label"]:
        raise ValueError(f"{FLAG}: {path} has no rows")
    if skipped > MAX_SKIPPED_FRACTION * total:
        raise ValueError(f"{FLAG}: {path}: {skipped} of {total} lines lack fields (expected {width} "
                         "tab-separated fields): is it the official GLUE file?")
    return columns, skipped


def glue_task(name: str, data_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(train, {eval split: dataset}, source) of GLUE task `name` from DIR's official files."""
    import datasets

    layout = GLUE_LAYOUTS[name]
    folder = Path(data_dir) / layout.folder
    splits: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for split, filename in {"train": "train.tsv", **layout.eval_files}.items():
        columns, skipped[split] = read_glue_file(folder / filename, layout)
        splits[split] = datasets.Dataset.from_dict(columns)
    source = {"files": str(folder), "skipped_lines": {s: n for s, n in skipped.items() if n}}
    return splits.pop("train"), splits, source


def squad_files(name: str, data_dir: Path) -> tuple[Path, Path]:
    """The official train and dev files of `squad` / `squad_v2` under DIR."""
    paths = tuple(Path(data_dir) / f for f in SQUAD_FILES[name])
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{FLAG}: {path} does not exist (--task {name} reads "
                             f"{' and '.join(SQUAD_FILES[name])} from {FLAG})")
    return paths[0], paths[1]
