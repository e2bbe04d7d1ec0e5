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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, BinaryIO

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHUNK_ROWS = 1024  # rows handed to a worker at a time


class DataError(ValueError):
    """Input data the pipeline cannot use; the message names the file (and row where there is one)."""


@dataclass(frozen=True)
class RawRow:
    source: str
    row: int  # 1-based line (JSONL, CSV incl. header) or item number (JSON, Parquet, datasets)
    record: Any = None
    error: str | None = None  # set when the row could not even be parsed
    line: bytes | None = None  # the raw JSONL line, parsed later (in a worker) when set


@dataclass(frozen=True)
class RawChunk:
    """Consecutive raw rows in columns: lists of plain values pickle several times faster than row objects,
    and a JSONL file becomes chunks without a Python object per line."""

    sources: list[str]
    rows: list[int]
    lines: list[bytes | None]
    records: list
    errors: list[str | None]

    @classmethod
    def of(cls, rows: list[RawRow]) -> "RawChunk":
        return cls([r.source for r in rows], [r.row for r in rows], [r.line for r in rows], [r.record for r in rows], [r.error for r in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def raw_rows(self) -> Iterator[RawRow]:
        return map(RawRow, self.sources, self.rows, self.records, self.errors, self.lines)


def in_chunks(rows: Iterable[RawRow]) -> Iterator[RawChunk]:
    iterator = iter(rows)
    while batch := list(islice(iterator, CHUNK_ROWS)):
        yield RawChunk.of(batch)


def suffix_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""


def read_stream(name: str, open_binary: Callable[[], BinaryIO], size: int | None) -> Iterator[RawChunk]:
    """Every row of one file, a chunk at a time; unparseable rows come back with `error` set."""
    suffix = suffix_of(name)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if size == 0:
        raise DataError(f"{name}: file is empty")
    try:
        with open_binary() as f:
            if suffix == ".jsonl":
                yield from _jsonl(name, f)
            else:
                yield from in_chunks({".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix](name, f))
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


def _jsonl(name: str, f: BinaryIO) -> Iterator[RawChunk]:
    """Lines are handed out unparsed (`lines`), so parsing happens where the rest of the row's work does;
    blank lines are skipped but counted, so row numbers stay line numbers."""
    first = 1
    while lines := list(islice(f, CHUNK_ROWS)):
        numbered = [(number, line) for number, line in enumerate(lines, start=first) if not line.isspace()]
        first += len(lines)
        if numbered:
            numbers, kept = map(list, zip(*numbered, strict=True))
            yield RawChunk([name] * len(kept), numbers, kept, [None] * len(kept), [None] * len(kept))


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
