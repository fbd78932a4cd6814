"""Downstream tasks: what each one is (columns, splits, metrics) and where its rows come from.

Four sources, one result: a `TaskData` holding `datasets.Dataset` splits in a common schema
(`sentence1` [`sentence2`] `label` for classification and regression; SQuAD's `id`, `context`,
`question`, `answers` for QA):
  * GLUE and SQuAD by name from their official files (`--data-dir`, `official_files.py`);
  * GLUE and SQuAD by name, through `datasets` from the Hugging Face hub (or its local cache);
  * the offline suite (`sctd_dist.data.downstream`), generated in memory;
  * local files: csv / tsv / jsonl with run_glue's columns, SQuAD-format json for QA.
Every input problem is found here, before a model is loaded, and raised as one ValueError line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Kind = Literal["classification", "regression", "qa"]
KINDS = ("classification", "regression", "qa")


@dataclass(frozen=True)
class TaskSpec:
    """How to read, train and score one task."""

    name: str
    kind: Kind
    metrics: tuple[str, ...]
    # Hub dataset (id, config); None for local and offline tasks.
    hub: tuple[str, str | None] | None = None
    # The source's text columns, renamed to sentence1/sentence2 (classification, regression).
    text_columns: tuple[str, ...] = ("sentence1",)
    eval_splits: tuple[str, ...] = ("validation",)
    version_2_with_negative: bool = False  # QA: questions may have no answer

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


def _glue(name: str, columns: tuple[str, ...], metrics: tuple[str, ...] = ("accuracy",),
          kind: Kind = "classification", eval_splits: tuple[str, ...] = ("validation",)) -> TaskSpec:
    return TaskSpec(name, kind, metrics, hub=("nyu-mll/glue", name), text_columns=columns,
                    eval_splits=eval_splits)


# Official metrics per GLUE task (Wang et al. 2019, table 1); SQuAD: exact match and F1.
NAMED_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _glue("cola", ("sentence",), ("matthews_correlation",)),
    _glue("sst2", ("sentence",)),
    _glue("mrpc", ("sentence1", "sentence2"), ("accuracy", "f1")),
    _glue("stsb", ("sentence1", "sentence2"), ("pearson", "spearmanr"), kind="regression"),
    _glue("qqp", ("question1", "question2"), ("accuracy", "f1")),
    _glue("mnli", ("premise", "hypothesis"), eval_splits=("validation_matched", "validation_mismatched")),
    _glue("qnli", ("question", "sentence")),
    _glue("rte", ("sentence1", "sentence2")),
    _glue("wnli", ("sentence1", "sentence2")),
    TaskSpec("squad", "qa", ("exact_match", "f1"), hub=("rajpurkar/squad", None)),
    TaskSpec("squad_v2", "qa", ("exact_match", "f1"), hub=("rajpurkar/squad_v2", None),
             version_2_with_negative=True),
    TaskSpec("stdlib-topic", "classification", ("accuracy",)),
    TaskSpec("stdlib-samedoc", "classification", ("accuracy", "f1"), text_columns=("sentence1", "sentence2")),
)}
OFFLINE_TASKS = ("stdlib-topic", "stdlib-samedoc")
GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
ALIASES = {"glue": GLUE, "offline": OFFLINE_TASKS}


@dataclass
class TaskData:
    """A task's spec and its splits (`datasets.Dataset`), validated."""

    spec: TaskSpec
    train: Any
    evals: dict[str, Any]
    labels: list | None = None  # classification: the label values, index = class id
    source: dict[str, Any] = field(default_factory=dict)  # provenance for the results JSON

    @property
    def num_labels(self) -> int:
        if self.spec.kind == "regression":
            return 1
        return len(self.labels or [])


# ----------------------------------------------------------------------------- local files

_TABLE_EXT = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}


def _check_file(path: Path, flag: str) -> None:
    if not path.is_file():
        raise ValueError(f"{flag} {path} does not exist")
    if path.suffix.lower() not in _TABLE_EXT:
        raise ValueError(f"{flag} {path}: unknown file type {path.suffix!r}; use .csv, .tsv, .jsonl "
                         "(columns sentence1 [sentence2] label) or SQuAD-format .json")
    if not _has_rows(path):
        raise ValueError(f"{flag} {path} has no rows")


def _has_rows(path: Path) -> bool:
    """Whether a file holds data beyond a csv/tsv header (a SQuAD json is checked when parsed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.suffix.lower() in (".csv", ".tsv"):
            next(f, None)  # the header
        return any(line.strip() for line in f)


def is_squad_json(path: Path) -> bool:
    """A .json file whose top level is an object with a `data` list (SQuAD format)."""
    if path.suffix.lower() != ".json":
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # json lines (one object per line), or not json at all
    return isinstance(doc, dict) and "data" in doc


def _read_table(path: Path, flag: str, cache_dir: str | None):
    """A csv/tsv/jsonl file as a `datasets.Dataset` (run_glue reads them the same way)."""
    import datasets

    kind = _TABLE_EXT[path.suffix.lower()]
    tsv = path.suffix.lower() == ".tsv"
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    try:
        return datasets.load_dataset(kind, data_files={"split": str(path)}, split="split", cache_dir=cache_dir,
                                     **options)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line naming the file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{flag} {path} could not be read as {path.suffix[1:]}: {reason}") from exc


def _check_columns(ds, path: Path, flag: str, pair: bool | None) -> tuple[str, ...]:
    """The text columns of a table (sentence1 [sentence2]), checked; `pair` forces the shape."""
    have = list(ds.column_names)
    need = ["sentence1", "label"] + (["sentence2"] if pair else [])
    absent = [c for c in need if c not in have]
    if absent:
        raise ValueError(f"{flag} {path} has columns {have}, missing {absent}: rename them to "
                         "sentence1 [sentence2] label (the run_glue convention)")
    if pair is False and "sentence2" in have:
        raise ValueError(f"{flag} {path} has a sentence2 column but the training file has none; "
                         "give both files the same columns")
    return ("sentence1", "sentence2") if "sentence2" in have else ("sentence1",)


def _is_number(value: Any) -> bool:
    """A finite number, or a string that reads as one (a csv column with one word in it is read
    as strings throughout)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rows(ds, path: Path, flag: str, kind: Kind, columns: tuple[str, ...]) -> None:
    """Every row has a label (numeric for regression) and text in each text column."""
    for i, label in enumerate(ds["label"]):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise ValueError(f"{flag} {path}: row {i + 1} column label is empty")
        if kind == "regression" and not _is_number(label):
            raise ValueError(f"{flag} {path}: a regression task needs numeric labels, row {i + 1} column label "
                             f"has {label!r}; fix the file or drop --task-type regression")
    for column in columns:
        for i, text in enumerate(ds[column]):
            if not isinstance(text, str) or not text.strip():
                got = "is empty" if text is None or isinstance(text, str) else f"holds {text!r}, not text"
                raise ValueError(f"{flag} {path}: row {i + 1} column {column} {got}")


def _check_eval_labels(ds, path: Path, flag: str, known: list) -> None:
    """Every validation label is one the training split taught (GLUE's -1 marks an unlabelled
    test row, which cannot be scored)."""
    seen = set(known)
    for i, label in enumerate(ds["label"]):
        if label not in seen:
            hint = " (-1 marks an unlabelled test row; a validation file needs gold labels)" if label == -1 else ""
            raise ValueError(f"{flag} {path}: row {i + 1} column label has {label!r}, a label the training "
                             f"split does not have ({[str(v) for v in known][:10]}){hint}")


def _infer_kind(ds) -> Kind:
    """run_glue's rule: float labels mean regression, anything else classification."""
    dtype = getattr(ds.features["label"], "dtype", None)
    return "regression" if dtype in ("float32", "float64") else "classification"


def read_squad_json(path: Path, flag: str) -> list[dict[str, Any]]:
    """The questions of a SQuAD-format file as rows {id, title, context, question, answers},
    with every answer checked against its context."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        articles = doc["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{flag} {path} is not SQuAD-format json (an object with a 'data' list): "
                         f"{exc}") from None
    rows: list[dict[str, Any]] = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise ValueError(f"{flag} {path}: a paragraph of {article.get('title')!r} has no 'context'")
            for qa in paragraph.get("qas", []):
                qid = qa.get("id")
                if qid is None or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{flag} {path}: a question of {article.get('title')!r} lacks 'id' "
                                     "or 'question'")
                texts, starts = [], []
                for answer in [] if qa.get("is_impossible") else qa.get("answers", []):
                    text, start = answer.get("text"), answer.get("answer_start")
                    found = isinstance(text, str) and isinstance(start, int) and \
                        context[start:start + len(text)] == text
                    if not found:
                        raise ValueError(f"{flag} {path}: question {qid!r}: answer {text!r} is not in its "
                                         f"context at answer_start {start}")
                    texts.append(text)
                    starts.append(start)
                rows.append({"id": str(qid), "title": str(article.get("title", "")), "context": context,
                             "question": qa["question"], "answers": {"text": texts, "answer_start": starts}})
    if not rows:
        raise ValueError(f"{flag} {path} holds no questions")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{flag} {path}: question id {dup!r} appears more than once")
    return rows


def load_local(train_file: Path, validation_file: Path, kind: Kind | None = None,
               cache_dir: str | None = None, name: str | None = None) -> TaskData:
    """A task from local files; `kind` None infers it (SQuAD json -> qa, float labels ->
    regression, else classification)."""
    import datasets

    files = {"--train-file": Path(train_file), "--validation-file": Path(validation_file)}
    for flag, path in files.items():
        _check_file(path, flag)
    squad = {flag: is_squad_json(path) for flag, path in files.items()}
    task_name = name or Path(train_file).parent.name or "local"
    if kind == "qa" or any(squad.values()):
        for flag, path in files.items():
            if not squad[flag]:
                raise ValueError(f"{flag} {path}: a question-answering task needs SQuAD-format json "
                                 "(an object with a 'data' list) for both files")
        if kind not in (None, "qa"):
            raise ValueError(f"--task-type {kind} does not fit SQuAD-format files; use --task-type qa")
        train_rows = read_squad_json(files["--train-file"], "--train-file")
        eval_rows = read_squad_json(files["--validation-file"], "--validation-file")
        v2 = any(not r["answers"]["text"] for r in train_rows + eval_rows)
        if not any(r["answers"]["text"] for r in train_rows):
            raise ValueError(f"--train-file {files['--train-file']}: no question has an answer to train on")
        spec = TaskSpec(task_name, "qa", ("exact_match", "f1"), version_2_with_negative=v2)
        return TaskData(spec, datasets.Dataset.from_list(train_rows),
                        {"validation": datasets.Dataset.from_list(eval_rows)},
                        source={k: str(v) for k, v in files.items()})
    train = _read_table(files["--train-file"], "--train-file", cache_dir)
    evaluation = _read_table(files["--validation-file"], "--validation-file", cache_dir)
    for flag, ds in (("--train-file", train), ("--validation-file", evaluation)):
        if len(ds) == 0:
            raise ValueError(f"{flag} {files[flag]} has no rows")
    columns = _check_columns(train, files["--train-file"], "--train-file", None)
    _check_columns(evaluation, files["--validation-file"], "--validation-file", len(columns) == 2)
    kind = kind or _infer_kind(train)
    for flag, ds in (("--train-file", train), ("--validation-file", evaluation)):
        _check_rows(ds, files[flag], flag, kind, columns)
    if kind == "regression":
        metrics: tuple[str, ...] = ("pearson", "spearmanr")
    else:
        values = set(train["label"])
        binary = values <= {0, 1} and len(values) == 2
        metrics = ("accuracy", "f1", "matthews_correlation") if binary else ("accuracy",)
    spec = TaskSpec(task_name, kind, metrics, text_columns=columns)
    data = TaskData(spec, train, {"validation": evaluation}, source={k: str(v) for k, v in files.items()})
    data = _with_labels(data, "--train-file", check_evals=False)
    if kind == "classification":
        _check_eval_labels(evaluation, files["--validation-file"], "--validation-file", data.labels or [])
    return data


# ----------------------------------------------------------------------------- named tasks

def _hub_error(spec: TaskSpec, exc: Exception) -> ValueError:
    dataset_id = spec.hub[0] + (f" ({spec.hub[1]})" if spec.hub and spec.hub[1] else "")
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ValueError(f"--task {spec.name} reads dataset {dataset_id} from the Hugging Face hub, which is not "
                      f"reachable here ({type(exc).__name__}: {reason[:200]}); run where the hub is reachable "
                      "once (the dataset is cached), or pass --train-file/--validation-file")


def load_hub(spec: TaskSpec, cache_dir: str | None) -> TaskData:
    """A task of the Hugging Face hub (`spec.hub`) in the common schema."""
    import datasets

    assert spec.hub is not None
    try:
        raw = datasets.load_dataset(spec.hub[0], spec.hub[1], cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - offline, unknown or unreachable: one line
        raise _hub_error(spec, exc) from None
    if spec.kind == "qa":
        keep = ["id", "title", "context", "question", "answers"]
        return TaskData(spec, raw["train"].select_columns(keep),
                        {s: raw[s].select_columns(keep) for s in spec.eval_splits},
                        source={"hub": spec.hub[0]})

    def normalise(ds):
        ds = ds.select_columns([*spec.text_columns, "label"])
        renames = {c: f"sentence{i + 1}" for i, c in enumerate(spec.text_columns) if c != f"sentence{i + 1}"}
        return ds.rename_columns(renames) if renames else ds

    data = TaskData(spec, normalise(raw["train"]), {s: normalise(raw[s]) for s in spec.eval_splits},
                    source={"hub": spec.hub[0], "config": spec.hub[1]})
    if spec.kind == "classification":
        feature = raw["train"].features["label"]
        data.labels = list(range(feature.num_classes)) if hasattr(feature, "num_classes") else None
    return data if data.labels else _with_labels(data, "--task")


def _load_offline(spec: TaskSpec) -> TaskData:
    import datasets

    from sctd_dist.data.downstream import build_task

    rows = build_task(spec.name)
    data = TaskData(spec, datasets.Dataset.from_list(rows["train"]),
                    {"validation": datasets.Dataset.from_list(rows["validation"])},
                    source={"generator": "sctd_dist.data.downstream"})
    return _with_labels(data, "--task")


def _with_labels(data: TaskData, flag: str, check_evals: bool = True) -> TaskData:
    """Classification: the sorted label values of the training split; every evaluation label must
    be one of them (checked here unless the caller names the row itself)."""
    if data.spec.kind != "classification":
        return data
    labels = sorted(set(data.train["label"]), key=lambda v: (str(type(v)), v))
    if len(labels) < 2:
        raise ValueError(f"the training split of {data.spec.name} has a single label {labels}; "
                         "a classification task needs at least two")
    known = set(labels)
    for split, ds in data.evals.items() if check_evals else ():
        unseen = sorted({str(v) for v in ds["label"] if v not in known})
        if unseen:
            raise ValueError(f"{flag}: the {split} split of {data.spec.name} has label(s) {unseen[:5]} that the "
                             f"training split does not have ({[str(v) for v in labels][:10]})")
    data.labels = labels
    return data


def _load_official(spec: TaskSpec, data_dir: Path) -> TaskData:
    """A GLUE or SQuAD task from its official files under `data_dir`."""
    import datasets

    from sctd_dist.finetune.official_files import FLAG, GLUE_LAYOUTS, glue_task, squad_files

    if spec.kind == "qa":
        train_path, dev_path = squad_files(spec.name, data_dir)
        splits = {s: datasets.Dataset.from_list(read_squad_json(p, FLAG))
                  for s, p in (("train", train_path), ("validation", dev_path))}
        return TaskData(spec, splits["train"], {"validation": splits["validation"]},
                        source={"files": [str(train_path), str(dev_path)]})
    train, evals, source = glue_task(spec.name, data_dir)
    labels = GLUE_LAYOUTS[spec.name].labels
    return TaskData(spec, train, evals, labels=list(labels) if labels else None, source=source)


def load_task(name: str, cache_dir: str | None = None, data_dir: Path | None = None) -> TaskData:
    """A task by name: GLUE, SQuAD (official files under `data_dir`, else the hub) or the offline suite."""
    if name not in NAMED_TASKS:
        raise ValueError(f"unknown --task {name!r}; choose one of {sorted(NAMED_TASKS)} "
                         "or pass --train-file/--validation-file")
    spec = NAMED_TASKS[name]
    if name in OFFLINE_TASKS:
        data = _load_offline(spec)
    elif data_dir is not None:
        data = _load_official(spec, Path(data_dir))
    else:
        data = load_hub(spec, cache_dir)
    for split, ds in [("train", data.train), *data.evals.items()]:
        if len(ds) == 0:
            raise ValueError(f"--task {name}: the {split} split has no rows")
    return data


def subsample(data: TaskData, max_train: int | None, max_eval: int | None) -> TaskData:
    """The first `max_train` / `max_eval` rows (run_glue's --max_train_samples semantics)."""
    train = data.train.select(range(min(max_train, len(data.train)))) if max_train else data.train
    evals = {s: ds.select(range(min(max_eval, len(ds)))) if max_eval else ds for s, ds in data.evals.items()}
    return replace(data, train=train, evals=evals)

