"""Where rows come from: JSONL/JSON/CSV/Parquet files, folders of them, `save_to_disk` folders, Hub datasets.

Files are read by our own strict readers, so a bad row is reported with its file and line (for a CSV
record over several lines, the line where it starts). A local folder's files for the split are found
by the same rules as `datasets.load_dataset` (file names like train-00000-of-00002.parquet, or the
README's `configs` for a subset), then read one by one, so an error names the shard file. A Hub
dataset id, and a folder holding files we have no reader for, go through `datasets.load_dataset`
(subset, split and revision included). A .txt file is plain text: one document per line, per
blank-line-separated paragraph, or per file (`data.text_sample_by`, as datasets' text loader).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = path.write_text('{"instruction": "hi", "output": "hello"}\\n')
    >>> [r.row for r in read_records(str(path), split="train", errors=ErrorLog("raise"))]
    [{'instruction': 'hi', 'output': 'hello'}]
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.data.errors import DataError, ErrorLog
from llmtune.paths import DATA_FILE_SUFFIXES, looks_like_hub_id

SUPPORTED_SUFFIXES = DATA_FILE_SUFFIXES
SAMPLE_BY = ("line", "paragraph", "document")


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (for error messages)."""

    row: dict[str, Any]
    where: str


def source_fingerprint(source: str) -> str:
    """A hash of a local data file's or folder's bytes ('' for a Hub id, whose data.revision pins it).

    Pipelines pass it to the prepare step so that its cache key changes when the data does, even
    at the same path: a scheduled run on edited data retrains, one on unchanged data does not.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = path.write_text("a"); before = source_fingerprint(str(path))
    >>> _ = path.write_text("b"); before != source_fingerprint(str(path)), source_fingerprint("owner/name")
    (True, '')
    """
    path = Path(source)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() if file == path else str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def read_records(
    source: str,
    split: str,
    errors: ErrorLog,
    subset: str | None = None,
    revision: str | None = None,
    text_sample_by: str = "line",
) -> list[Record]:
    """Every row of `source` (a file, a folder, or a Hub dataset id), with its location."""
    path = Path(source)
    if path.is_file():
        return read_file(path, errors, text_sample_by)
    if path.is_dir() and is_saved_dataset(path):
        return _read_saved_dataset(path, split)
    if path.is_dir():
        files = resolved_split_files(path, split, subset)
        if files and all(f.suffix.lower() in SUPPORTED_SUFFIXES for f in files):
            return [record for file in files for record in read_file(file, errors, text_sample_by)]
    if path.is_dir() or looks_like_hub_id(source):
        return _read_with_load_dataset(source, split, subset, revision, errors)
    raise DataError(
        f"Dataset source '{source}' does not exist and is not a Hub dataset id (owner/name). Set data.source "
        f"to a {'/'.join(s.lstrip('.') for s in SUPPORTED_SUFFIXES)} file, a folder of them, or a Hub id."
    )


def read_file(path: Path, errors: ErrorLog, text_sample_by: str = "line") -> list[Record]:
    """Rows of one local data file, chosen by its suffix."""
    readers: dict[str, Callable[[Path, ErrorLog], list[Record]]] = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
        ".txt": lambda p, _: read_text(p, text_sample_by),
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'. Use one of: {', '.join(readers)}.")
    return reader(path, errors)


def read_text(path: Path, sample_by: str = "line") -> list[Record]:
    """Plain text as `text` rows: one per non-blank line, per blank-line-separated paragraph, or the whole file.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text("one\\ntwo\\n\\nthree\\n")
    >>> [r.row["text"] for r in read_text(path, "paragraph")], read_text(path)[2].where.endswith("line 4")
    (['one\\ntwo', 'three'], True)
    """
    text = _decode(path)
    if sample_by == "document":
        return [Record({"text": text}, f"{path}, line 1")] if text.strip() else []
    if sample_by not in SAMPLE_BY:
        raise DataError(f"Unknown data.text_sample_by '{sample_by}'; use one of {', '.join(SAMPLE_BY)}.")
    records: list[Record] = []
    block: list[str] = []
    start = 0
    for number, line in enumerate([*text.splitlines(), ""], start=1):  # a blank line at the end closes the last block
        if sample_by == "line" and line.strip():
            records.append(Record({"text": line}, f"{path}, line {number}"))
        elif sample_by == "paragraph" and line.strip():
            block, start = [*block, line], start or number
        elif block:
            records.append(Record({"text": "\n".join(block)}, f"{path}, line {start}"))
            block, start = [], 0
    return records


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark, as spreadsheet exports often have one
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}). "
            f"Re-save the file as UTF-8."
        ) from None


def _read_jsonl(path: Path, errors: ErrorLog) -> list[Record]:
    records = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.bad(f"{where}: malformed JSON ({err.msg} at column {err.colno}).")
            continue
        if isinstance(row, dict):
            records.append(Record(row, where))
        else:
            errors.bad(f"{where}: expected a JSON object, got {type(row).__name__}.")
    return records


def _read_json(path: Path, errors: ErrorLog) -> list[Record]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must be an array of objects (or use one object per line, .jsonl).")
    records = []
    for number, row in enumerate(data, start=1):
        if isinstance(row, dict):
            records.append(Record(row, f"{path}, item {number}"))
        else:
            errors.bad(f"{path}, item {number}: expected a JSON object, got {type(row).__name__}.")
    return records


def _read_csv(path: Path, errors: ErrorLog) -> list[Record]:
    """Rows under the header; a location is the line where the record starts (quoted cells may span lines)."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    header: list[str] | None = None
    records, ended = [], 0
    for cells in reader:
        start, ended = ended + 1, reader.line_num
        if not cells:  # a blank line
            continue
        if header is None:
            header = cells
            continue
        where = f"{path}, line {start}"
        if len(cells) > len(header):
            errors.bad(f"{where}: more cells than the header has columns ({len(header)}).")
        elif len(cells) < len(header):
            errors.bad(f"{where}: fewer cells than the header has columns ({len(header)}).")
        else:
            records.append(Record(dict(zip(header, cells, strict=True)), where))
    if header is None:
        raise DataError(f"{path}: the CSV file has no header row.")
    return records


def _read_parquet(path: Path, errors: ErrorLog) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
        raise DataError(f"{path}: not a readable Parquet file ({err}).") from None
    return [Record(row, f"{path}, row {number}") for number, row in enumerate(rows, start=1)]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_saved_dataset(path: Path, split: str) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split '{split}' (it has {', '.join(loaded)}). Set data.split.")
        loaded = loaded[split]
    return [Record(row, f"{path} [{split}], row {n}") for n, row in enumerate(loaded.to_list(), start=1)]


def _read_with_load_dataset(
    source: str, split: str, subset: str | None, revision: str | None, errors: ErrorLog
) -> list[Record]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, name=subset, split=split, revision=revision)
    except Exception as err:  # the hub client and builders raise many types; keep the cause, lose the trace
        if Path(source).is_dir():
            return _read_folder_strictly(Path(source), split, errors, err)
        raise DataError(_load_failure(source, subset, split, err)) from None
    where = f"{source}" + (f" ({subset})" if subset else "") + f" [{split}]"
    return [Record(row, f"{where}, row {n}") for n, row in enumerate(loaded.to_list(), start=1)]


def _read_folder_strictly(folder: Path, split: str, errors: ErrorLog, cause: Exception) -> list[Record]:
    """Re-read the split's files one by one: names the bad line, and lets on_error=skip read around it."""
    files = split_files(folder, split)
    records = [record for file in files for record in read_file(file, errors)]
    if not files or (errors.count == 0 and errors.policy == "raise"):
        raise DataError(_load_failure(str(folder), None, split, cause))
    return records


def resolved_split_files(folder: Path, split: str, subset: str | None) -> list[Path]:
    """The files `datasets.load_dataset(folder, subset, split=split)` would read (README configs included)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder), name=subset)
        files = (builder.config.data_files or {}).get(split, [])
    except Exception:  # no recognisable data files, or an unknown subset: load_dataset says it best
        return []
    return [Path(str(f)) for f in files]


def split_files(folder: Path, split: str) -> list[Path]:
    """The data files of one split in a folder, by the same naming rules as the Hub (train*.jsonl, data/test-*)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception:  # no recognisable data files
        return []
    return sorted(Path(str(f)) for f in resolved.get(split, []) if str(f).endswith(SUPPORTED_SUFFIXES))


def _load_failure(source: str, subset: str | None, split: str, err: Exception) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    which = f"subset '{subset}', " if subset else ""
    return (
        f"Could not load dataset '{source}' ({which}split '{split}'): {detail}. Check data.source, data.subset, "
        f"data.split and data.revision (a Hub id needs network access or a local cache)."
    )
