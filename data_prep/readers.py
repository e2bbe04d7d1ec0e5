"""Read local data files row by row, keeping the row number so a bad row can be quarantined by name.

JSONL is read line by line (a malformed line is one bad row, not a failed file); JSON, CSV and Parquet
through the standard library and pyarrow, streamed where the format allows.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Input data the pipeline cannot use; the message names the file (and row where there is one)."""


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int  # 1-based line (JSONL, CSV data rows) or item number (JSON, Parquet)
    record: Any = None
    error: str | None = None  # set when the row could not even be parsed


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a file; unparseable rows come back with `error` set."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[path.suffix.lower()]
    try:
        yield from reader(path)
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None


def _jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(str(path), number, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                yield RawRow(str(path), number, record=json.loads(text))
            except json.JSONDecodeError as exc:
                yield RawRow(str(path), number, error=f"invalid JSON: {exc.msg} at column {exc.colno}")


def _json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON file must hold an object or a list of objects, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield RawRow(str(path), number, record=record)


def _csv(path: Path) -> Iterator[RawRow]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}: CSV has no header row")
            for number, record in enumerate(reader, start=2):  # line 1 is the header
                if None in record or any(v is None for v in record.values()):
                    yield RawRow(str(path), number, error=f"expected {len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)})")
                    continue
                yield RawRow(str(path), number, record=dict(record))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield RawRow(str(path), number, record=record)
