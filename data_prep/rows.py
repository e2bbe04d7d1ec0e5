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


@dataclass(slots=True)
class Processed:
    """One row's outcome, sent back from a worker: arrays travel as bytes, which pickle cheaply."""

    source: str
    row: int
    reason: str | None = None  # quarantine reason
    record_preview: str | None = None
    line: bytes | None = None  # the canonical row as a UTF-8 JSON line, newline included
    kind: str | None = None
    fmt: str | None = None
    key: int = 0  # exact-duplicate key
    signature: bytes | None = None  # MinHash values (uint64)
    grams: bytes | None = None  # word n-gram hashes (uint32), for the contamination check
    pii: Counter = field(default_factory=Counter)


class _WordHashes(dict):
    """xxh32 of each word, computed once per worker and looked up from C through map()."""

    LIMIT = 2_000_000

    def __missing__(self, word: str) -> int:
        if len(self) >= self.LIMIT:
            self.clear()
        value = self[word] = xxhash.xxh32_intdigest(word.encode())
        return value


class Sketcher:
    """Per-row sketches computed in numpy over a whole chunk of rows from one pass of word hashing:
    - MinHash signatures of word 3-grams for datasketch's MinHashLSH (num_perm multiply-add maps mod 2^32);
    - word n-gram hashes (uint32) for the contamination check.
    """

    def __init__(self, num_perm: int | None, ngram: int | None, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        if num_perm:
            self.a = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | 1).astype(np.uint32)
            self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
        self._words = _WordHashes()

    def sketch(self, rows_texts: list[list[str]]) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        if not rows_texts:
            return [], []
        words = [" ".join(texts).lower().split() or [""] for texts in rows_texts]
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        w = np.fromiter(map(self._words.__getitem__, (x for row in words for x in row)), dtype=np.uint32, count=int(lengths.sum()))
        signatures = self._signatures(w, starts, lengths) if self.num_perm else [None] * len(words)
        grams = self._grams(w, starts, lengths) if self.ngram else [None] * len(words)
        return signatures, grams

    def _signatures(self, w: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        # 3-gram hash at each word position, mixing the word and the next two
        grams = w * np.uint32(0x9E3779B1) ^ np.roll(w, -1) * np.uint32(0x85EBCA77) ^ np.roll(w, -2) * np.uint32(0xC2B2AE3D)
        per_row = np.maximum(lengths - 2, 1)
        keep = np.ones(len(w), dtype=bool)
        for start, length, count in zip(starts, lengths, per_row, strict=True):  # 3-grams must not run into the next row
            keep[start + count : start + length] = False
        permuted = grams[keep][:, None] * self.a[None, :] + self.b[None, :]
        firsts = np.concatenate(([0], np.cumsum(per_row)[:-1]))
        return list(np.minimum.reduceat(permuted, firsts, axis=0).astype(np.uint64))

    def _grams(self, w: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        n = self.ngram
        rolled = np.zeros(len(w), dtype=np.uint32)
        for k in range(n):
            rolled = rolled * np.uint32(0x01000193) + np.roll(w, -k)
        rolled ^= rolled >> np.uint32(15)
        out = []
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            if length < n:  # a short row is one n-gram of all its words
                value = 0
                for k in range(length):
                    value = (value * 0x01000193 + int(w[start + k])) & 0xFFFFFFFF
                out.append(np.array([value ^ (value >> 15)], dtype=np.uint32))
                continue
            out.append(np.unique(rolled[start : start + length - n + 1]))
        return out


class RowProcessor:
    def __init__(self, pii_types: list[str], num_perm: int | None, ngram: int | None):
        self.redactor = Redactor(pii_types)
        self.sketcher = Sketcher(num_perm, ngram) if (num_perm or ngram) else None

    def chunk(self, rows: list[RawRow], settings: RowSettings) -> list[Processed]:
        results = [self.row(raw, settings) for raw in rows]
        if self.sketcher is not None:
            kept = [(item, row) for item, row in results if row is not None]
            signatures, grams = self.sketcher.sketch([row_texts(row) for _, row in kept])
            for (item, _), signature, gram in zip(kept, signatures, grams, strict=True):
                item.signature = None if signature is None else signature.tobytes()
                item.grams = None if gram is None else gram.tobytes()
        return [item for item, _ in results]

    def row(self, raw: RawRow, settings: RowSettings) -> tuple[Processed, dict | None]:
        """The processed row, and its canonical form (None when quarantined)."""
        # a JSONL line has at least as many bytes as characters, so only long lines need counting
        needs_size_check = raw.line is None or len(raw.line) > settings.max_row_chars
        if raw.line is not None:
            raw = parse_jsonl_line(raw.source, raw.row, raw.line)
        if needs_size_check and raw.error is None:
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
        canonical = json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        out.key = xxhash.xxh3_64_intdigest(canonical)
        out.line = canonical + b"\n"
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


def init_worker(pii_types: list[str], num_perm: int | None, ngram: int | None) -> None:
    global _PROCESSOR
    _PROCESSOR = RowProcessor(pii_types, num_perm, ngram)


def process_chunk(chunk: tuple[list[RawRow], RowSettings]) -> list[Processed]:
    rows, settings = chunk
    return _PROCESSOR.chunk(rows, settings)
