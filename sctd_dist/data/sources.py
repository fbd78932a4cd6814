"""Turn `--input` arguments into `datasets.Dataset`s with a single "text" column.

Accepted forms (all read through `datasets`, memory-mapped Arrow underneath):

* a local file: `.txt`/`.text` (one document per line by default, see `text_sample_by`),
  `.jsonl`/`.json`/`.ndjson`, `.parquet`, optionally compressed (`.gz`, `.bz2`, `.xz`, `.zst`);
* a local folder: a dataset written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or
  any folder of the files above (searched recursively, sorted by path, grouped by type);
* a glob pattern of files (`corpus/*.jsonl`);
* a Hugging Face Hub dataset `NAME[:CONFIG[:SPLIT]]` (split defaults to "train"), e.g.
  `wikimedia/wikipedia:20231101.en:train`. Needs network (or the local HF cache).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".ndjson": "json",
             ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
SUPPORTED_SUFFIXES = tuple(sorted(_BUILDERS))


@dataclass
class Source:
    """One input, loaded: its spec as given, a description for the metadata, and the rows."""

    spec: str
    kind: str
    dataset: Any  # datasets.Dataset with exactly one column, "text"
    description: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return len(self.dataset)


def builder_for(path: Path) -> str | None:
    """The `datasets` packaged builder for a file name ("text", "json", "parquet") or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _looks_local(spec: str) -> bool:
    """Specs that can only mean a local path (so a miss is 'file not found', not a hub lookup)."""
    if spec.startswith((".", "/", "~")) or builder_for(Path(spec)) is not None:
        return True
    parent = Path(spec).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()  # "data/corpus" with ./data present


def _file_stats(files: list[Path]) -> list[dict]:
    return [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _text_only(ds: Any, spec: str, text_column: str) -> Any:
    """Keep the text column only, named "text"; clear error if there is none."""
    from datasets import Value

    columns = list(ds.column_names)
    if text_column in columns:
        column = text_column
    else:
        strings = [c for c in columns if ds.features[c] in (Value("string"), Value("large_string"))]
        if len(strings) != 1:
            raise ValueError(f"input {spec} has no {text_column!r} column (columns: {columns}); "
                             "choose one with --text-column")
        column = strings[0]
    if ds.features[column] not in (Value("string"), Value("large_string")):
        raise ValueError(f"column {column!r} of input {spec} holds {ds.features[column]}, not text; "
                         "choose another with --text-column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


ENCODING_ERRORS = ("strict", "replace", "ignore")  # what to do with bytes that are not UTF-8


def first_invalid_utf8(path: Path) -> int | None:
    """The byte offset of the first invalid UTF-8 sequence in a file (of its decompressed
    content when compressed), or None when the whole file decodes."""
    import codecs

    import fsspec

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read so far
    with fsspec.open(str(path), "rb", compression="infer") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = len(decoder.getstate()[0])  # an incomplete sequence carried from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            if not chunk:
                return None
            offset += len(chunk)


def _encoding_error(group: list[Path], spec: str) -> ValueError | None:
    """A one-line error naming the first file of `group` that is not UTF-8, and where."""
    for f in group:
        offset = first_invalid_utf8(f)
        if offset is not None:
            where = " of its decompressed text" if f.suffix.lower() in _COMPRESSION else ""
            return ValueError(f"input {spec}: {f} is not valid UTF-8 at byte {offset}{where}; fix the file, "
                              "or pass --encoding-errors replace (bad bytes become U+FFFD) or ignore "
                              "(they are dropped)")
    return None


def _load_files(files: list[Path], spec: str, text_column: str, text_sample_by: str,
                cache_dir: str | None, encoding_errors: str = "strict") -> list[Source]:
    import datasets

    groups: dict[str, list[Path]] = {}
    files = [f for f in files if f.stat().st_size > 0]  # `datasets` cannot build from empty files
    for f in files:
        builder = builder_for(f)
        if builder is None:
            raise ValueError(f"input {f}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        groups.setdefault(builder, []).append(f)
    sources = []
    for builder in sorted(groups):
        group = groups[builder]
        kwargs: dict[str, Any] = {"sample_by": text_sample_by} if builder == "text" else {}
        if builder != "parquet":  # parquet text is always UTF-8
            kwargs["encoding_errors"] = encoding_errors
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in group], split="train",
                                       cache_dir=cache_dir, **kwargs)
        except Exception as err:  # malformed JSON/parquet and the like: name the files
            cause = err.__cause__ or err
            if isinstance(cause, UnicodeDecodeError) or "codec can't decode" in str(cause):
                bad = _encoding_error(group, spec)
                if bad is not None:
                    raise bad from None
            raise ValueError(f"cannot read input {spec} as {builder} ({', '.join(map(str, group[:3]))}"
                             f"{', ...' if len(group) > 3 else ''}): {cause}") from err
        desc = {"type": builder, "files": _file_stats(group)}
        if builder == "text":
            desc["sample_by"] = text_sample_by
        if encoding_errors != "strict" and builder != "parquet":  # strict: as folders made before
            desc["encoding_errors"] = encoding_errors
        sources.append(Source(spec, builder, _text_only(ds, spec, text_column), desc))
    return sources


def _load_saved(folder: Path, spec: str, text_column: str) -> Source:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    split = None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            split = "train"
        elif len(loaded) == 1:
            split = next(iter(loaded))
        else:
            raise ValueError(f"input {spec} holds splits {list(loaded)} and none is 'train'; "
                             "save the split you want on its own")
        loaded = loaded[split]
    desc = {"type": "save_to_disk", "path": str(folder), "split": split, "rows": len(loaded),
            "fingerprint": getattr(loaded, "_fingerprint", None)}
    return Source(spec, "save_to_disk", _text_only(loaded, spec, text_column), desc)


def _load_hub(spec: str, text_column: str, cache_dir: str | None) -> Source:
    import datasets

    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"input {spec!r}: a Hub dataset is NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as err:  # the hub raises many types (offline, 404, auth)
        raise FileNotFoundError(
            f"input {spec!r} is not a local file or folder, and loading it as a Hugging Face Hub "
            f"dataset (name={name!r}, config={config!r}, split={split!r}) failed: {err}") from err
    desc = {"type": "hub", "name": name, "config": config, "split": split, "rows": len(ds),
            "fingerprint": getattr(ds, "_fingerprint", None)}
    return Source(spec, "hub", _text_only(ds, spec, text_column), desc)


def load_sources(specs: list[str], *, text_column: str = "text", text_sample_by: str = "line",
                 cache_dir: str | Path | None = None, encoding_errors: str = "strict") -> list[Source]:
    """Load every `--input` spec, in order, as text-only datasets (see the module docstring).
    `encoding_errors` is what bytes that are not UTF-8 in .txt/.jsonl files do: stop the run
    naming file and byte offset (strict), become U+FFFD (replace) or vanish (ignore)."""
    if not specs:
        raise ValueError("no --input given")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, got {encoding_errors!r}")
    if text_sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"text_sample_by must be line, paragraph or document, got {text_sample_by!r}")
    cache = str(cache_dir) if cache_dir is not None else None
    sources: list[Source] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            sources += _load_files([path.resolve()], spec, text_column, text_sample_by, cache, encoding_errors)
        elif path.is_dir():
            if _is_saved_dataset(path):
                sources.append(_load_saved(path, spec, text_column))
                continue
            files = sorted(p.resolve() for p in path.rglob("*") if p.is_file() and builder_for(p))
            if not files:
                raise FileNotFoundError(f"input folder {spec} holds no {'/'.join(SUPPORTED_SUFFIXES)} "
                                        "files and is not a save_to_disk dataset")
            sources += _load_files(files, spec, text_column, text_sample_by, cache, encoding_errors)
        elif glob.has_magic(spec):
            files = sorted(Path(p).resolve() for p in glob.glob(os.path.expanduser(spec), recursive=True)
                           if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"input pattern {spec} matches no files")
            sources += _load_files(files, spec, text_column, text_sample_by, cache, encoding_errors)
        elif _looks_local(spec):
            raise FileNotFoundError(f"input {spec} does not exist (resolved to {path.resolve()})")
        else:
            sources.append(_load_hub(spec, text_column, cache))
    return sources
