"""The per-row work of the data stage: parse, normalise, validate, redact, and sketch for de-duplication.

It is pure (a chunk of raw rows in, a columnar result out) so it runs in worker processes; the
de-duplication index and the files stay in the parent. Results travel as a few numpy arrays and one bytes
blob per chunk, which pickle at memory speed, so the parent's share of the work stays small.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import xxhash

from data_prep.formats import (
    KIND_OF_FORMAT,
    RowError,
    kind_of,
    map_texts,
    rename_columns,
    row_texts,
    to_canonical,
)
from data_prep.pii import Redactor
from data_prep.readers import RawChunk, RawRow, parse_jsonl_line

QUARANTINE_RECORD_CHARS = 2_000  # a quarantined row keeps at most this much of its record (plus its file and row)
FORMATS = tuple(KIND_OF_FORMAT)
KINDS = ("chat", "text", "preference")


@dataclass(frozen=True)
class RowSettings:
    """What one source asks of its rows (picklable, sent to workers with each chunk)."""

    fmt: str
    columns: tuple[tuple[str, str], ...]
    system_prompt: str | None
    system_mode: str
    max_row_chars: int
    seed: int
    eval_fraction: float
    max_nesting: int = 32
    quarantine_raw: bool = False  # write quarantined rows as they came, PII included


@dataclass(slots=True)
class ChunkResult:
    """One chunk's outcome. Valid rows are columns in chunk order; `position` says where each (and each
    quarantined row) stood in the chunk, so the parent can stop exactly at a row (max_samples)."""

    size: int  # raw rows in the chunk
    quarantined: list[tuple[int, bytes]]  # (position, quarantine.jsonl line)
    position: np.ndarray  # int32, valid rows
    ends: np.ndarray  # int64 end offset of each row's line in `lines`
    lines: bytes  # canonical rows as UTF-8 JSON lines
    keys: np.ndarray  # uint64 exact-duplicate key (hash of the canonical row)
    held_out: np.ndarray  # bool: goes to eval when the source is split
    weight_unit: np.ndarray  # float64 in [0, 1): decides the fractional copy of a weighted row
    fmt: np.ndarray  # uint8 index into FORMATS
    kind: np.ndarray  # uint8 index into KINDS
    pii: np.ndarray  # uint32 (rows x PII types) redactions per row
    bands: np.ndarray | None  # uint32 (rows x bands) MinHash LSH bucket keys
    signatures: np.ndarray | None  # uint32 (rows x num_perm) MinHash signatures
    grams: np.ndarray | None  # uint32 word n-gram hashes of all rows, row after row
    gram_counts: np.ndarray | None  # int64 n-gram hashes per row

    def line(self, i: int) -> bytes:
        return self.lines[self.ends[i - 1] if i else 0 : self.ends[i]]


_P = np.uint64(0x100000001B3)  # odd: invertible mod 2^64, so a word's hash does not depend on where it starts
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64), top 32 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((x ^ (x >> np.uint64(31))) >> np.uint64(32)).astype(np.uint32)


class Sketcher:
    """Per-row sketches computed in numpy over a whole chunk of rows:
    - MinHash signatures of word 3-grams (num_perm multiply-add maps mod 2^32, datasketch's affine32 scheme),
      and one 32-bit bucket key per LSH band (bands x rows as datasketch's MinHashLSH picks them);
    - word n-gram hashes (uint32) for the contamination check.
    Words are whitespace-separated, lower-cased, hashed from the UTF-8 bytes with prefix sums."""

    def __init__(self, num_perm: int | None, ngram: int | None, bands: tuple[int, int] | None = None, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.ngram, self.bands = ngram, bands
        if num_perm:
            self.a = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | 1).astype(np.uint32)
            self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
        self._powers = np.ones(1, dtype=np.uint64)
        self._inverse_powers = np.ones(1, dtype=np.uint64)

    def words(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hash of every word of every text (uint32), and each text's word count (a text without words
        counts as one empty word, so every row has a sketch)."""
        texts = [t.lower() if t and not t.isspace() else "\x01" for t in texts]
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
        space = _WHITESPACE[data]
        starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
        ends = np.flatnonzero(~space & np.concatenate((space[1:], [True]))) + 1
        prefix = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum((data.astype(np.uint64) + np.uint64(1)) * self._power_table(len(data)), dtype=np.uint64)))
        raw = (prefix[ends] - prefix[starts]) * self._inverse_powers[starts]
        text_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
        counts = np.bincount(np.searchsorted(text_starts, starts, side="right") - 1, minlength=len(texts))
        return _mix32(raw), counts

    def _power_table(self, length: int) -> np.ndarray:
        if len(self._powers) < length:
            size = max(length, 2 * len(self._powers))
            self._powers = np.cumprod(np.full(size, _P, dtype=np.uint64), dtype=np.uint64) * _P_INV
            self._inverse_powers = np.cumprod(np.full(size, _P_INV, dtype=np.uint64), dtype=np.uint64) * _P
        return self._powers[:length]

    def sketch(self, texts: list[str]) -> tuple[np.ndarray | None, ...]:
        """(band keys (rows x bands), signatures (rows x num_perm), n-gram hashes flat, n-gram counts per row)
        for one text per row."""
        w, counts = self.words(texts)
        position = np.arange(len(w)) - np.repeat(np.cumsum(counts) - counts, counts)
        left = np.repeat(counts, counts) - position  # words left in the row from here, this one included
        signatures = self.signatures(w, counts, position, left) if self.bands else None
        bands = self.band_keys(signatures) if self.bands else None
        grams, gram_counts = self._grams(w, counts, position, left) if self.ngram else (None, None)
        return bands, signatures, grams, gram_counts

    def signatures(self, w: np.ndarray, counts: np.ndarray, position: np.ndarray, left: np.ndarray) -> np.ndarray:
        """MinHash of each row's word 3-grams (a row of one or two words is one gram of them)."""
        zero = np.uint32(0)
        grams = (w * np.uint32(0x9E3779B1) ^ np.where(left > 1, np.roll(w, -1), zero) * np.uint32(0x85EBCA77)
                 ^ np.where(left > 2, np.roll(w, -2), zero) * np.uint32(0xC2B2AE3D))
        per_row = np.maximum(counts - 2, 1)
        grams = grams[position < np.repeat(per_row, counts)]
        permuted = grams[None, :] * self.a[:, None] + self.b[:, None]  # (num_perm, grams): reduce along the fast axis
        return np.ascontiguousarray(np.minimum.reduceat(permuted, np.cumsum(per_row) - per_row, axis=1).T)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """One key per band: a hash of the band's slice of the signature and of the band's number."""
        bands, rows = self.bands
        keys = np.empty((len(signatures), bands), dtype=np.uint32)
        for band in range(bands):
            h = np.full(len(signatures), 0x9E3779B97F4A7C15 * (band + 1) % 2**64, dtype=np.uint64)
            for column in range(band * rows, (band + 1) * rows):
                h = (h ^ signatures[:, column].astype(np.uint64)) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(29)
            keys[:, band] = _mix32(h)
        return keys

    def _grams(self, w, counts, position, left) -> tuple[np.ndarray, np.ndarray]:
        """Word n-gram hashes per row, rows one after another (a row shorter than n is one gram of all its
        words). Repeats within a row are left in: the few rows that hit an eval prompt are de-duplicated there."""
        n = self.ngram
        rolled = np.zeros(len(w), dtype=np.uint32)
        for k in range(n):
            rolled = rolled * np.uint32(0x01000193) + np.where(left > k, np.roll(w, -k), np.uint32(0))
        rolled ^= rolled >> np.uint32(15)
        per_row = np.maximum(counts - n + 1, 1)
        return rolled[position < np.repeat(per_row, counts)], per_row


class RowProcessor:
    def __init__(self, pii_types: list[str], num_perm: int | None, ngram: int | None, bands: tuple[int, int] | None = None):
        self.pii_types = list(pii_types)
        self.redactor = Redactor(pii_types)
        self.sketcher = Sketcher(num_perm, ngram, bands) if (bands or ngram) else None

    def chunk(self, chunk: RawChunk, settings: RowSettings) -> ChunkResult:
        quarantined, position, lines, rows, fmts, kinds, pii = [], [], [], [], [], [], []
        for i, raw in enumerate(chunk.raw_rows()):
            counts: Counter[str] = Counter()
            outcome = self.row(raw, settings, counts)
            if isinstance(outcome, bytes):
                quarantined.append((i, outcome))
                continue
            fmt, row, line = outcome
            position.append(i)
            lines.append(line)
            rows.append(row)
            fmts.append(FORMATS.index(fmt))
            kinds.append(KINDS.index(kind_of(row)))
            pii.append([counts.get(t, 0) for t in self.pii_types])
        keys = np.fromiter(map(xxhash.xxh3_64_intdigest, lines), dtype=np.uint64, count=len(lines))
        sketches = self.sketcher.sketch([" ".join(row_texts(r)) for r in rows]) if self.sketcher and rows else (None,) * 4
        bands, signatures, grams, gram_counts = sketches
        return ChunkResult(
            size=len(chunk), quarantined=quarantined, position=np.array(position, dtype=np.int32),
            ends=np.cumsum([len(line) + 1 for line in lines], dtype=np.int64), lines=b"".join(line + b"\n" for line in lines), keys=keys,
            held_out=np.array([held_out(k, settings.eval_fraction, settings.seed) for k in keys.tolist()], dtype=bool),
            weight_unit=np.array([unit_hash(k, settings.seed, "weight") for k in keys.tolist()], dtype=np.float64),
            fmt=np.array(fmts, dtype=np.uint8), kind=np.array(kinds, dtype=np.uint8),
            pii=np.array(pii, dtype=np.uint32).reshape(len(lines), len(self.pii_types)),
            bands=bands, signatures=signatures, grams=grams, gram_counts=gram_counts,
        )

    def row(self, raw: RawRow, settings: RowSettings, pii_counts: Counter) -> tuple[str, dict, bytes] | bytes:
        """(format, canonical row, its JSON text); or, for a bad row, its quarantine.jsonl line. No row raises: what
        this code did not foresee is quarantined with the exception, and counted like any other bad row."""
        try:
            raw = self._checked(raw, settings)
            if raw.error:
                raise RowError(raw.error)
            record = rename_columns(raw.record, dict(settings.columns))
            fmt, row = to_canonical(record, settings.fmt, settings.system_prompt, settings.system_mode)
            row = map_texts(row, lambda text: self.redactor.redact(text, pii_counts))
            return fmt, row, json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        except RowError as exc:
            return self._quarantine_line(raw, str(exc), settings)
        except Exception as exc:  # noqa: BLE001 - one row must never stop the stage
            return self._quarantine_line(raw, f"row could not be processed: {type(exc).__name__}: {exc}", settings)

    @staticmethod
    def _checked(raw: RawRow, settings: RowSettings) -> RawRow:
        """The row parsed (a JSONL line) and held to the size and nesting limits. A JSONL line has at least as many
        bytes as characters and as many brackets as levels, so most lines need neither count."""
        line = raw.line
        if line is not None:
            raw = parse_jsonl_line(raw.source, raw.row, line)
        if raw.error is not None:
            return raw
        if line is None or len(line) > settings.max_row_chars or line.count(b"[") + line.count(b"{") > settings.max_nesting:
            return RawRow(raw.source, raw.row, raw.record, _shape_error(raw.record, settings.max_row_chars, settings.max_nesting))
        return raw

    def _quarantine_line(self, raw: RawRow, reason: str, settings: RowSettings) -> bytes:
        """The quarantine.jsonl line of a bad row: where it was, why, and its start, PII redacted unless
        data.quarantine_raw (a code point JSON cannot encode as UTF-8 is written as its escape)."""
        record = _preview(raw.record)
        if not settings.quarantine_raw:
            reason = self.redactor.redact(reason, Counter())
            record = None if record is None else self.redactor.redact(record, Counter())
        line = {"source": raw.source, "row": raw.row, "reason": reason, "record": record}
        return json.dumps(line, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


def held_out(key: int, eval_fraction: float, seed: int) -> bool:
    """Whether a row (by its content key) goes to eval: a hash of content and seed, so the split is stable
    under reordering and reruns."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()) < int(eval_fraction * 2**64)


def unit_hash(key: int, seed: int, purpose: str) -> float:
    """A number in [0, 1) fixed by the row's content, the seed and what it decides."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{purpose}:{key}".encode()) / 2**64


def _shape_error(record, max_chars: int, max_nesting: int) -> str | None:
    """Why a record is too deep or too big for a row, walking it without recursion (its depth is the question)."""
    chars, stack = 0, [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, (dict, list)):
            if depth > max_nesting:
                return f"row is nested more than data.max_nesting={max_nesting} levels deep"
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return f"row has {chars:,} characters, above data.max_row_chars={max_chars:,}" if chars > max_chars else None


def _preview(record) -> str | None:
    if record is None:
        return None
    try:
        text = json.dumps(record, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return None
    return text if len(text) <= QUARANTINE_RECORD_CHARS else text[:QUARANTINE_RECORD_CHARS] + f"... ({len(text):,} characters)"


# Worker-process state: one processor per process, built by the pool initializer.
_PROCESSOR: RowProcessor | None = None


def init_worker(pii_types: list[str], num_perm: int | None, ngram: int | None, bands: tuple[int, int] | None) -> None:
    global _PROCESSOR
    _PROCESSOR = RowProcessor(pii_types, num_perm, ngram, bands)


def process_chunk(chunk: tuple[RawChunk, RowSettings]) -> ChunkResult:
    rows, settings = chunk
    return _PROCESSOR.chunk(rows, settings)
