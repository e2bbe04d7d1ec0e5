"""Read data files row by row, keeping the row number so a bad row can be quarantined by name.

Every reader takes a binary file object, so local files and fsspec remote files (s3://, gs://, az://,
https://, memory://) stream the same way. JSONL is read line by line: a malformed line is one bad row,
not a failed file (datasets' JSON loader would fail the whole file).
"""
from __future__ import annotations

import codecs
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


def read_stream(name: str, open_binary: Callable[[], BinaryIO], size: int | None, max_field_chars: int = 200_000) -> Iterator[RawChunk]:
    """Every row of one file, a chunk at a time; unparseable rows come back with `error` set. Text files may start
    with a byte-order mark: UTF-8's is dropped, UTF-16 and UTF-32 files are decoded by theirs."""
    suffix = suffix_of(name)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{name}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if size == 0:
        raise DataError(f"{name}: file is empty")
    try:
        with open_binary() as f:
            if suffix == ".parquet":
                yield from in_chunks(_parquet(name, f))
                return
            f = f if hasattr(f, "peek") else io.BufferedReader(f)
            encoding = text_encoding(f.peek(4)[:4])
            if suffix == ".csv":
                yield from in_chunks(_csv(name, _text(f, encoding), max_field_chars))
                return
            lines = f if encoding.startswith("utf-8") else (line.encode("utf-8") for line in _text(f, encoding))
            yield from _jsonl(name, lines) if suffix == ".jsonl" else in_chunks(_json(name, lines))
    except PermissionError:
        raise DataError(f"{name}: permission denied") from None
    except UnicodeDecodeError as exc:  # a UTF-16/32 file (UTF-8 is checked row by row)
        raise DataError(f"{name}: not valid {exc.encoding} ({exc.reason})") from None


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def text_encoding(head: bytes) -> str:
    """The encoding a text file's byte-order mark names (UTF-32's is tested before UTF-16's, which it starts with);
    UTF-8 without one."""
    return next((encoding for bom, encoding in _BOMS if head.startswith(bom)), "utf-8")


def _text(f: BinaryIO, encoding: str) -> io.TextIOWrapper:
    """A text view of the file without its byte-order mark. UTF-8 bytes that do not decode are kept as surrogates,
    so the row holding them, not the file, is rejected."""
    utf8 = encoding.startswith("utf-8")
    return io.TextIOWrapper(f, encoding="utf-8-sig" if utf8 else encoding, errors="surrogateescape" if utf8 else "strict", newline="")


def parse_jsonl_line(source: str, number: int, raw: bytes) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(source, number, error=f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")
    try:
        return RawRow(source, number, record=json.loads(text))
    except json.JSONDecodeError as exc:
        return RawRow(source, number, error=f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return RawRow(source, number, error="JSON nested too deeply to parse")


def _jsonl(name: str, f: Iterable[bytes]) -> Iterator[RawChunk]:
    """Lines are handed out unparsed (`lines`), so parsing happens where the rest of the row's work does;
    blank lines are skipped but counted, so row numbers stay line numbers."""
    first = 1
    while lines := list(islice(f, CHUNK_ROWS)):
        if first == 1 and lines[0].startswith(codecs.BOM_UTF8):
            lines[0] = lines[0][len(codecs.BOM_UTF8):]
        numbered = [(number, line) for number, line in enumerate(lines, start=first) if not line.isspace()]
        first += len(lines)
        if numbered:
            numbers, kept = map(list, zip(*numbered, strict=True))
            yield RawChunk([name] * len(kept), numbers, kept, [None] * len(kept), [None] * len(kept))


def _json(name: str, f: Iterable[bytes]) -> Iterator[RawRow]:
    try:
        text = b"".join(f).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # one item too deep for the parser: parse the items one by one, so only that one is lost
        for number, item in enumerate(_json_items(text), start=1):
            yield parse_jsonl_line(name, number, item.encode("utf-8", "surrogatepass"))
        return
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{name}: a JSON file must hold an object or a list of objects, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield RawRow(name, number, record=record)


def _json_items(text: str) -> Iterator[str]:
    """The text of each item of a top-level JSON list, found by tracking brackets outside strings."""
    start = text.index("[") + 1 if text.lstrip().startswith("[") else 0
    depth, in_string, escaped, item_start = 0, False, False, start
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}" and depth:
            depth -= 1
        elif (c == "," or c == "]") and depth == 0:
            yield text[item_start:i]
            item_start = i + 1
            if c == "]":
                return


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8


def _csv(name: str, text: io.TextIOWrapper, max_field_chars: int) -> Iterator[RawRow]:
    """A field longer than max_field_chars is a bad row (the csv module's own limit, 131,072, would fail the file)."""
    csv.field_size_limit(max(max_field_chars, 131_072))
    reader = csv.DictReader(text)
    if not reader.fieldnames:
        raise DataError(f"{name}: CSV has no header row")
    columns = len(reader.fieldnames)
    while True:
        line_before = reader.line_num
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader goes on at the next line
            yield RawRow(name, line_before + 1, error=f"unreadable CSV row: {exc} (data.max_row_chars={max_field_chars:,})")
            continue
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
