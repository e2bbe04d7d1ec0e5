"""Read data files row by row, keeping the row number so a bad row can be quarantined by name.

Every reader takes a binary file object, so local files and fsspec remote files (s3://, gs://, az://,
https://, memory://) stream the same way. JSONL is read line by line: a malformed line is one bad row,
not a failed file (datasets' JSON loader would fail the whole file).
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Input data the pipeline cannot use; the message names the file (and row where there is one)."""


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int  # 1-based line (JSONL, CSV incl. header) or item number (JSON, Parquet, datasets)
    record: Any = None
    error: str | None = None  # set when the row could not even be parsed
    line: bytes | None = None  # the raw JSONL line, parsed later (in a worker) when set


def suffix_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""


def read_stream(name: str, open_binary: Callable[[], BinaryIO], size: int | None) -> Iterator[RawRow]:
    """Yield every row of one file; unparseable rows come back with `error` set."""
    suffix = suffix_of(name)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if size == 0:
        raise DataError(f"{name}: file is empty")
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix]
    try:
        with open_binary() as f:
            yield from reader(name, f)
    except PermissionError:
        raise DataError(f"{name}: permission denied") from None


def parse_jsonl_line(source: str, number: int, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(source, number, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")
    try:
        return RawRow(source, number, record=json.loads(text))
    except json.JSONDecodeError as exc:
        return RawRow(source, number, error=f"invalid JSON: {exc.msg} at column {exc.colno}")


def _jsonl(name: str, f: BinaryIO) -> Iterator[RawRow]:
    """Lines are handed out unparsed (`line`), so parsing happens where the rest of the row's work does."""
    for number, raw in enumerate(f, start=1):
        if raw.strip():
            yield RawRow(name, number, line=raw)


def _json(name: str, f: BinaryIO) -> Iterator[RawRow]:
    try:
        data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: a JSON file must hold an object or a list of objects, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield RawRow(name, number, record=record)


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _csv(name: str, f: BinaryIO) -> Iterator[RawRow]:
    """Bytes that are not UTF-8 are kept as surrogates so the row, not the file, is rejected."""
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline=""))
    if not reader.fieldnames:
        raise DataError(f"{name}: CSV has no header row")
    columns = len(reader.fieldnames)
    for record in reader:
        number = reader.line_num
        if None in record or any(v is None for v in record.values()):
            yield RawRow(name, number, error=f"expected {columns} columns ({', '.join(reader.fieldnames)})")
        elif any(_UNDECODABLE.search(v) for v in record.values()):
            yield RawRow(name, number, error="not valid UTF-8")
        else:
            yield RawRow(name, number, record=dict(record))


def _parquet(name: str, f: BinaryIO) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield RawRow(name, number, record=record)
