"""The per-row work of the data stage: parse, normalise, validate, redact, and hash for de-duplication.

It is pure (row in, result out) so it can run in worker processes; de-duplication state and file
writing stay in the parent.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import xxhash

from data_prep.formats import RowError, kind_of, map_texts, rename_columns, row_texts, to_canonical
from data_prep.pii import Redactor
from data_prep.readers import RawRow, parse_jsonl_line

QUARANTINE_RECORD_CHARS = 2_000  # a quarantined row keeps at most this much of its record (plus its file and row)


@dataclass(frozen=True)
class RowSettings:
    """What one source asks of its rows (picklable, sent to workers with each chunk)."""

    fmt: str
    columns: tuple[tuple[str, str], ...]
    system_prompt: str | None
    system_mode: str
    max_row_chars: int


@dataclass
class Processed:
    source: str
    row: int
    reason: str | None = None  # quarantine reason
    record_preview: str | None = None
    canonical: str | None = None  # JSON line of the canonical row
    kind: str | None = None
    fmt: str | None = None
    key: int = 0  # exact-duplicate key
    signature: np.ndarray | None = None  # MinHash values
    pii: Counter = field(default_factory=Counter)


class MinHasher:
    """MinHash signatures of word 3-grams, for datasketch's MinHashLSH.

    Each word is hashed once (xxh32); a 3-gram's hash combines its words' hashes, and the num_perm hash
    functions are multiply-add maps modulo 2^32 (odd multipliers). All of it runs in numpy over a whole
    chunk of rows at once, which keeps the per-row cost near the cost of reading the words."""

    def __init__(self, num_perm: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | 1).astype(np.uint32)
        self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)

    def signatures(self, rows_texts: list[list[str]]) -> list[np.ndarray]:
        if not rows_texts:
            return []
        word_hashes, starts, lengths = [], [], []
        for texts in rows_texts:
            words = " ".join(texts).lower().split() or [""]
            starts.append(len(word_hashes))
            lengths.append(len(words))
            word_hashes.extend(xxhash.xxh32_intdigest(w.encode()) for w in words)
        w = np.asarray(word_hashes, dtype=np.uint32)
        # 3-gram hash at each word position: mixes the word and the next two (wrapping at a row's end is harmless)
        grams = w * np.uint32(0x9E3779B1) ^ np.roll(w, -1) * np.uint32(0x85EBCA77) ^ np.roll(w, -2) * np.uint32(0xC2B2AE3D)
        keep = np.ones(len(w), dtype=bool)
        for start, length in zip(starts, lengths, strict=True):  # drop 3-grams that would run into the next row
            keep[start + max(length - 2, 1) : start + length] = False
        row_of = np.repeat(np.arange(len(starts)), [max(n - 2, 1) for n in lengths])
        permuted = grams[keep][:, None] * self.a[None, :] + self.b[None, :]
        firsts = np.searchsorted(row_of, np.arange(len(starts)))
        return list(np.minimum.reduceat(permuted, firsts, axis=0).astype(np.uint64))


class RowProcessor:
    def __init__(self, pii_types: list[str], num_perm: int | None):
        self.redactor = Redactor(pii_types)
        self.hasher = MinHasher(num_perm) if num_perm else None

    def chunk(self, rows: list[RawRow], settings: RowSettings) -> list[Processed]:
        results = [self.row(raw, settings) for raw in rows]
        if self.hasher is not None:
            kept = [(item, row) for item, row in results if row is not None]
            for (item, _), signature in zip(kept, self.hasher.signatures([row_texts(row) for _, row in kept]), strict=True):
                item.signature = signature
        return [item for item, _ in results]

    def row(self, raw: RawRow, settings: RowSettings) -> tuple[Processed, dict | None]:
        """The processed row, and its canonical form (None when quarantined)."""
        if raw.line is not None:
            if len(raw.line) > settings.max_row_chars:  # bytes >= characters, so only long lines need counting
                raw = parse_jsonl_line(raw.source, raw.row, raw.line)
                raw = RawRow(raw.source, raw.row, raw.record, raw.error or _size_error(raw.record, settings.max_row_chars))
            else:
                raw = parse_jsonl_line(raw.source, raw.row, raw.line)
        elif raw.error is None:
            raw = RawRow(raw.source, raw.row, raw.record, _size_error(raw.record, settings.max_row_chars))
        out = Processed(raw.source, raw.row)
        try:
            if raw.error:
                raise RowError(raw.error)
            record = rename_columns(raw.record, dict(settings.columns))
            out.fmt, row = to_canonical(record, settings.fmt, settings.system_prompt, settings.system_mode)
        except RowError as exc:
            out.reason = str(exc)
            out.record_preview = _preview(raw.record)
            return out, None
        row = map_texts(row, lambda text: self.redactor.redact(text, out.pii))
        out.kind = kind_of(row)
        out.canonical = json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        out.key = xxhash.xxh3_64_intdigest(out.canonical.encode())
        return out, row


def _size_error(record, limit: int) -> str | None:
    size = _chars(record)
    return f"row has {size:,} characters, above data.max_row_chars={limit:,}" if size > limit else None


def _chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _preview(record) -> str | None:
    if record is None:
        return None
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= QUARANTINE_RECORD_CHARS else text[:QUARANTINE_RECORD_CHARS] + f"... ({len(text):,} characters)"


# Worker-process state: one processor per process, built by the pool initializer.
_PROCESSOR: RowProcessor | None = None


def init_worker(pii_types: list[str], num_perm: int | None) -> None:
    global _PROCESSOR
    _PROCESSOR = RowProcessor(pii_types, num_perm)


def process_chunk(chunk: tuple[list[RawRow], RowSettings]) -> list[Processed]:
    rows, settings = chunk
    return _PROCESSOR.chunk(rows, settings)
