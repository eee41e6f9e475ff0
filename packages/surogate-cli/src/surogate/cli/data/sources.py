"""Reading dataset rows: local .jsonl / .json / .parquet / .txt files, folders of them, and Hugging Face Hub datasets
when the optional `datasets` package is installed. Every row keeps its origin ("train.jsonl:12") so that problems are
reported with a file and a row number. Lines that are not valid JSON are returned as problems, not raised: the caller
counts and reports them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs

from ..config import DatasetConfig
from ..errors import DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")


@attrs.define
class Row:
    origin: str  # "file:line" (jsonl, txt), "file:index" (json, parquet) or "hub-id:index"
    data: Any


@attrs.define
class BadRow:
    origin: str
    kind: str  # "empty" or "malformed"
    reason: str


def dataset_files(ds: DatasetConfig) -> list[Path] | None:
    """The local files of a dataset entry (a file, or every supported file under a folder); None for a Hub id."""
    path = Path(ds.path)
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"unsupported file type {path.suffix!r}; surogate reads {', '.join(SUFFIXES)}",
                            file=str(path), fix="convert the file to .jsonl, or point path at a supported file")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"the folder holds no dataset files ({', '.join(SUFFIXES)})", file=str(path),
                            fix="point path at a folder with .jsonl/.json/.parquet/.txt files")
        return files
    if _looks_like_hub_id(ds.path):
        return None
    raise DataError("dataset file not found", file=str(path), fix="check the path (relative paths are taken from the "
                    "current directory, then from the YAML's folder)")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(parts[0]).exists()


def fingerprint(ds: DatasetConfig) -> str:
    """A content hash of the dataset's files (sha256), or the Hub id + subset + split for a Hub dataset."""
    files = dataset_files(ds)
    h = hashlib.sha256()
    if files is None:
        h.update(f"hub:{ds.path}:{ds.subset}:{ds.split}".encode())
        return h.hexdigest()
    for f in files:
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_rows(ds: DatasetConfig) -> tuple[list[Row], list[BadRow]]:
    """All rows of a dataset entry (the first `samples` if set) and the lines that could not be parsed."""
    files = dataset_files(ds)
    rows: list[Row] = []
    bad: list[BadRow] = []
    if files is not None and (ds.split != "train" or ds.subset):
        key = "subset" if ds.subset else "split"
        raise DataError(f"`{key}` applies to Hugging Face Hub datasets; a local file or folder is read whole",
                        file=ds.path, key=key, fix="remove it (use `samples: N` to take the first N rows, or "
                        "validation_split_ratio / validation_datasets for a held-out part)")
    if files is None:
        rows = _load_hub(ds)
    else:
        for f in files:
            r, b = _load_file(f, ds)
            rows += r
            bad += b
            if ds.samples is not None and len(rows) >= ds.samples:
                break
    if ds.samples is not None:
        rows = rows[: ds.samples]
    if not rows and not bad:
        raise DataError("the dataset is empty (no rows)", file=ds.path, fix="point path at a file with data")
    return rows, bad


def _load_file(path: Path, ds: DatasetConfig) -> tuple[list[Row], list[BadRow]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _load_jsonl(path)
        if suffix == ".json":
            return _load_json(path)
        if suffix == ".parquet":
            return _load_parquet(path), []
        return _load_txt(path, ds.text_field), []
    except UnicodeDecodeError as e:
        raise DataError(f"is not UTF-8 text ({e.reason} at byte {e.start})", file=str(path),
                        fix="re-encode the file as UTF-8") from None


def _load_jsonl(path: Path) -> tuple[list[Row], list[BadRow]]:
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines; they are not rows
            try:
                rows.append(Row(f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadRow(f"{path}:{n}", "malformed", f"not valid JSON ({e.msg} at column {e.colno})"))
    return rows, bad


def _load_json(path: Path) -> tuple[list[Row], list[BadRow]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return [], []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON Lines saved as .json
            return _load_jsonl(path)
        raise DataError(f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", file=str(path),
                        fix="fix the JSON, or save one object per line as .jsonl") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("a .json dataset must hold a list of rows (or an object with one list of rows)",
                            file=str(path), fix="save the rows as a JSON list, or one object per line as .jsonl")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"a .json dataset must hold a list of rows, got {type(data).__name__}", file=str(path),
                        fix="save the rows as a JSON list, or one object per line as .jsonl")
    return [Row(f"{path}:{i}", r) for i, r in enumerate(data)], []


def _load_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow", file=str(path),
                        fix='pip install "surogate-cli[data]"') from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise DataError(f"cannot be read as parquet ({e})", file=str(path), fix="re-export the file") from None
    return [Row(f"{path}:{i}", r) for i, r in enumerate(table.to_pylist())]


def _load_txt(path: Path, text_field: str) -> list[Row]:
    """Plain text: one row per non-blank line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if line.strip():
                rows.append(Row(f"{path}:{n}", {text_field: line}))
    return rows


def _load_hub(ds: DatasetConfig) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError("no such file or folder, and Hugging Face Hub datasets need the `datasets` package",
                        file=ds.path, fix='pip install "surogate-cli[hub]", or check the path') from None
    try:
        data = datasets.load_dataset(ds.path, ds.subset, split=ds.split)
    except Exception as e:  # network, missing dataset, bad split: all reported the same way
        raise DataError(f"cannot load the Hub dataset ({type(e).__name__}: {e})", file=ds.path,
                        fix="check the dataset id, subset and split") from None
    if ds.samples is not None:
        data = data.select(range(min(ds.samples, len(data))))
    return [Row(f"{ds.path}:{i}", r) for i, r in enumerate(data)]
