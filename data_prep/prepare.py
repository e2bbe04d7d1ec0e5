"""The data stage: sources -> canonical rows -> validate/quarantine -> clean/redact/dedup -> split ->
contamination check -> (token-length filter) -> files and a report whose counts reconcile.

Rows stream through: files are read lazily, the per-row work runs in `data.workers` processes a few
chunks ahead of the writer, which decides a chunk at a time with numpy; only the de-duplication index
(8 bytes a key, a few keys per kept row) and the eval prompts' n-grams stay in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import xxhash

from data_prep.dedup import KEPT, REASONS, ContaminationIndex, Deduplicator, lsh_bands
from data_prep.files import atomic_write_json, sha256_file
from data_prep.pii import RedactingFilter, Redactor, redact_tree
from data_prep.readers import DataError
from data_prep.rows import (
    FORMATS,
    KINDS,
    ChunkResult,
    RowProcessor,
    RowSettings,
    held_out,
    init_worker,
    process_chunk,
)
from data_prep.sources import iter_chunks
from recipes.schema import DataSection, DataSource

log = logging.getLogger(__name__)

MAX_LISTED_PAIRS = 1000


@dataclass
class SourceCounts:
    """rows_in = kept + quarantined + sum(removed); written counts weight copies of kept training rows."""

    path: str
    role: str  # train | eval | train+eval (split)
    rows_in: int = 0
    kept: int = 0
    quarantined: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    written: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    pii_redacted: dict[str, int] = field(default_factory=dict)
    stopped_at_max_samples: bool = False

    def reconciles(self) -> bool:
        return self.rows_in == self.kept + self.quarantined + sum(self.removed.values())


@dataclass
class PreparedData:
    """What the data stage hands to training and evaluation."""

    train_path: str
    eval_path: str
    quarantine_path: str
    report_path: str
    fingerprint: str
    train_rows: int
    eval_rows: int
    quarantined_rows: int
    sources: list[SourceCounts]
    kinds: dict[str, int] = field(default_factory=dict)
    contamination: dict = field(default_factory=dict)
    overlong: str = "drop"
    token_lengths: dict = field(default_factory=dict)
    cache_key: str = ""
    reused: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreparedData":
        return cls(**{**data, "sources": [SourceCounts(**s) for s in data["sources"]]})


def prepare_data(section: DataSection, out_dir: str | Path, reuse: bool = True) -> PreparedData:
    """Read every source, quarantine bad rows, clean, de-duplicate, split, check contamination; write files.

    The cache key is the source files' fingerprint plus the data section: when out_dir already holds data
    prepared under the same key, it is reused as it is (reuse=False forces a rebuild). With workers > 1
    the row work runs in spawned processes, so a script calling this needs an `if __name__ == "__main__":`
    guard (the CLI and Prefect have one)."""
    out_dir = Path(out_dir)
    key = cache_key(section)
    redacting = RedactingFilter(Redactor(redacted_types(section)))
    log.addFilter(redacting)
    try:
        if reuse and (cached := load_prepared(out_dir, key)) is not None:
            log.info("data: reusing prepared data in %s (cache key %s)", out_dir, key[:12])
            return cached
        return _prepare(section, out_dir, key)
    finally:
        log.removeFilter(redacting)


def _prepare(section: DataSection, out_dir: Path, key: str) -> PreparedData:
    out_dir.mkdir(parents=True, exist_ok=True)
    # report.json marks the folder complete: remove it first, so a crash mid-way is never taken for finished data
    (out_dir / "report.json").unlink(missing_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "eval", "quarantine")}
    staged_train = out_dir / ".train.unchecked.jsonl"
    staged_grams = out_dir / ".train.grams.bin"  # each staged training row's n-gram hashes, in the same order
    counts: list[SourceCounts] = []
    kinds: Counter[str] = Counter()
    with _Processor(section) as processor, paths["eval"].open("wb") as eval_out, staged_train.open("wb") as train_out, \
            paths["quarantine"].open("wb") as quarantine, staged_grams.open("wb") as grams_out:
        writer = _SplitWriter(section, train_out, eval_out, quarantine, kinds, grams_out)
        if section.eval_sources:
            with Deduplicator(section.dedup, out_dir) as eval_dedup:
                for source in section.eval_sources:
                    counts.append(writer.consume(source, "eval", processor.run(source), eval_dedup))
        with Deduplicator(section.dedup, out_dir) as train_dedup:
            role = "train" if section.eval_sources else "train+eval"
            for source in section.sources:
                counts.append(writer.consume(source, role, processor.run(source), train_dedup))
    _check_invalid_fraction(counts, section.max_invalid_fraction, paths["quarantine"])
    contamination = _check_contamination(section, paths["eval"], staged_train, staged_grams, paths["train"])
    train_rows, eval_rows = _count_lines(paths["train"]), _count_lines(paths["eval"])
    if not train_rows:
        raise DataError(f"no training rows left after validation, cleaning and split; see {paths['quarantine']} and the report")
    if not eval_rows:
        raise DataError("no evaluation rows: add data.eval_sources or raise data.eval_fraction")
    result = PreparedData(
        train_path=str(paths["train"]), eval_path=str(paths["eval"]), quarantine_path=str(paths["quarantine"]),
        report_path=str(out_dir / "report.json"), fingerprint=files_fingerprint(section, paths["train"], paths["eval"]),
        train_rows=train_rows, eval_rows=eval_rows, quarantined_rows=sum(c.quarantined for c in counts),
        sources=counts, kinds=dict(kinds), contamination=contamination, overlong=section.overlong, cache_key=key,
    )
    write_report(result)
    log.info("data: %d train, %d eval, %d quarantined rows; fingerprint %s", train_rows, eval_rows, result.quarantined_rows, result.fingerprint[:12])
    return result


def write_report(result: PreparedData) -> None:
    atomic_write_json(Path(result.report_path), {**result.to_dict(), "reused": False})


def cache_key(section: DataSection) -> str:
    """What prepared data depends on: the sources' bytes and every data option that changes the output."""
    return hashlib.sha256(f"{source_fingerprint(section)}\x00{section.model_dump_json(exclude={'workers'})}".encode()).hexdigest()


def load_prepared(out_dir: Path, key: str) -> PreparedData | None:
    """The data prepared earlier under this cache key, if its files are all still there."""
    report = out_dir / "report.json"
    if not report.is_file():
        return None
    data = PreparedData.from_dict(json.loads(report.read_text()))
    files = (data.train_path, data.eval_path, data.quarantine_path)
    if data.cache_key != key or not all(Path(p).is_file() for p in files):
        return None
    data.reused = True
    return data


class _Processor:
    """Runs the per-row work in a pool of worker processes (or in this process when workers == 1)."""

    def __init__(self, section: DataSection):
        self.section = section
        self.pii_types = redacted_types(section)
        self.worker_args = (self.pii_types, section.dedup.num_perm, section.contamination.ngram if section.contamination.check else None,
                            lsh_bands(section.dedup))
        self.pool = None

    def __enter__(self) -> "_Processor":
        if self.section.workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch threads
            self.pool = context.Pool(self.section.workers, initializer=init_worker, initargs=self.worker_args)
        else:
            self.local = RowProcessor(*self.worker_args)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def run(self, source: DataSource) -> Iterator[ChunkResult]:
        section = self.section
        settings = RowSettings(source.format, tuple(source.columns.items()), section.system_prompt, section.system_prompt_mode,
                               section.max_row_chars, section.seed, section.eval_fraction, section.max_nesting,
                               section.quarantine_raw)
        chunks = ((chunk, settings) for chunk in iter_chunks(source, section.max_row_chars))
        if self.pool is None:
            for chunk, _ in chunks:
                yield self.local.chunk(chunk, settings)
            return
        pending: deque = deque()
        for item in chunks:  # a bounded window of chunks in flight keeps memory flat on any input size
            pending.append(self.pool.apply_async(process_chunk, (item,)))
            if len(pending) >= 2 * section.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _SplitWriter:
    """Decides each processed row's fate, a chunk at a time, and writes it: quarantine, duplicate, train
    (with weight) or eval. Training rows' n-gram hashes go to a sidecar for the contamination pass."""

    def __init__(self, section: DataSection, train_out, eval_out, quarantine, kinds: Counter, grams_out):
        self.section = section
        self.train_out, self.eval_out, self.quarantine, self.grams_out = train_out, eval_out, quarantine, grams_out
        self.kinds = kinds
        self.pii_types = redacted_types(section)
        self.redactor = Redactor(self.pii_types)

    def consume(self, source: DataSource, role: str, chunks: Iterator[ChunkResult], dedup: Deduplicator) -> SourceCounts:
        count = SourceCounts(path=self.redactor.redact(source.name, Counter()), role=role)
        removed: Counter[str] = Counter()
        formats, kinds = np.zeros(len(FORMATS), dtype=np.int64), np.zeros(len(KINDS), dtype=np.int64)
        pii = np.zeros(len(self.pii_types), dtype=np.int64)
        for chunk in chunks:
            verdict = dedup.decide(chunk.keys, chunk.bands, chunk.signatures)
            taken = len(chunk.keys)  # valid rows of this chunk that count (all, unless max_samples stops inside it)
            if source.max_samples and count.kept + int(np.sum(verdict == KEPT)) >= source.max_samples:
                taken = int(np.flatnonzero(verdict == KEPT)[source.max_samples - count.kept - 1]) + 1
                count.stopped_at_max_samples = True
            verdict = verdict[:taken]
            dedup.commit(*(None if column is None else column[:taken] for column in (chunk.keys, chunk.bands, chunk.signatures)), verdict)
            end = int(chunk.position[taken - 1]) + 1 if count.stopped_at_max_samples else chunk.size
            count.rows_in += end
            bad = [line for position, line in chunk.quarantined if position < end]
            count.quarantined += len(bad)
            self.quarantine.write(b"".join(bad))
            for code, reason in REASONS.items():
                removed[reason] += int(np.sum(verdict == code))
            kept = np.flatnonzero(verdict == KEPT)
            count.kept += len(kept)
            formats += np.bincount(chunk.fmt[kept], minlength=len(FORMATS))
            kinds += np.bincount(chunk.kind[kept], minlength=len(KINDS))
            pii += chunk.pii[kept].sum(axis=0, dtype=np.int64)
            count.written += self._write(chunk, kept, role, source.weight)
            if count.stopped_at_max_samples:
                break
        count.removed = {reason: n for reason, n in removed.items() if n}
        count.formats = {name: int(n) for name, n in zip(FORMATS, formats, strict=True) if n}
        count.pii_redacted = {name: int(n) for name, n in zip(self.pii_types, pii, strict=True) if n}
        self.kinds.update({name: int(n) for name, n in zip(KINDS, kinds, strict=True) if n})
        log.info("data: %s (%s): %d rows in, %d kept, %d quarantined, removed %s, pii %s", source.name, role,
                 count.rows_in, count.kept, count.quarantined, count.removed, count.pii_redacted)
        return count

    def _write(self, chunk: ChunkResult, kept: np.ndarray, role: str, weight: float) -> int:
        """Write the kept rows; returns how many lines (weight copies included)."""
        if role == "eval":
            to_eval, to_train = kept, kept[:0]
        elif role == "train+eval":
            to_eval, to_train = kept[chunk.held_out[kept]], kept[~chunk.held_out[kept]]
        else:
            to_eval, to_train = kept[:0], kept
        self.eval_out.write(b"".join(chunk.line(i) for i in to_eval.tolist()))
        copies = int(weight) + (chunk.weight_unit[to_train] < weight - int(weight))
        to_train = np.repeat(to_train, copies)
        self.train_out.write(b"".join(chunk.line(i) for i in to_train.tolist()))
        if chunk.grams is not None and len(to_train):
            sizes = chunk.gram_counts[to_train]
            starts = (np.cumsum(chunk.gram_counts) - chunk.gram_counts)[to_train]
            gather = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
            self.grams_out.write(np.uint32(len(to_train)).tobytes() + sizes.astype(np.uint32).tobytes() + chunk.grams[gather].tobytes())
        return len(to_eval) + len(to_train)


def redacted_types(section: DataSection) -> list[str]:
    """The PII types redacted, in the order the workers count them."""
    return list(section.pii.types) if section.pii.redact else []


def redacted_section(section: DataSection) -> dict:
    """The data section as the manifest and the model card show it: every string (system prompt, source names)
    through the same redactor as the rows."""
    return redact_tree(section.model_dump(mode="json"), Redactor(redacted_types(section)))


def _check_invalid_fraction(counts: list[SourceCounts], limit: float, quarantine_path: Path) -> None:
    total = sum(c.rows_in for c in counts)
    bad = sum(c.quarantined for c in counts)
    if total and bad / total > limit:
        worst = max(counts, key=lambda c: c.quarantined / max(c.rows_in, 1))
        raise DataError(
            f"{bad} of {total} rows ({bad / total:.1%}) are invalid, above data.max_invalid_fraction={limit:g}; "
            f"worst source {worst.path} ({worst.quarantined}/{worst.rows_in}); reasons in {quarantine_path}"
        )
    empty = [c.path for c in counts if c.rows_in == 0]
    if empty:
        raise DataError(f"{empty[0]}: source has no rows")


def _check_contamination(section: DataSection, eval_path: Path, staged_train: Path, staged_grams: Path, train_path: Path) -> dict:
    """Compare every training row with the eval prompts; report overlapping pairs, drop them if asked."""
    config = section.contamination
    if not config.check:
        os.replace(staged_train, train_path)
        staged_grams.unlink(missing_ok=True)
        return {"checked": False}
    index = ContaminationIndex(config)
    with eval_path.open(encoding="utf-8") as f:
        index.add_eval_rows([json.loads(line) for line in islice(f, config.max_eval_rows)])
    pairs, contaminated_rows, eval_hit = [], 0, set()
    with staged_train.open("rb") as src, staged_grams.open("rb") as grams, train_path.open("wb") as dst:
        number = 0
        while header := grams.read(4):  # one record per written chunk: row count, gram counts, grams
            rows = int(np.frombuffer(header, dtype=np.uint32)[0])
            sizes = np.frombuffer(grams.read(4 * rows), dtype=np.uint32).astype(np.int64)
            flat = np.frombuffer(grams.read(4 * int(sizes.sum())), dtype=np.uint32)
            lines = list(islice(src, rows))
            kept = []
            for line, hits in zip(lines, index.overlaps(flat, sizes), strict=True):
                number += 1
                if hits:
                    contaminated_rows += 1
                    eval_hit.update(i for i, _ in hits)
                    pairs.extend({"train_row": number, "eval_row": i + 1, "overlap": share} for i, share in hits[: MAX_LISTED_PAIRS - len(pairs)])
                    if config.remove:
                        continue
                kept.append(line)
            dst.write(b"".join(kept))
    staged_train.unlink()
    staged_grams.unlink()
    result = {"checked": True, "ngram": config.ngram, "min_overlap": config.min_overlap, "eval_rows_indexed": index.indexed,
              "contaminated_train_rows": contaminated_rows, "eval_rows_hit": len(eval_hit), "removed": contaminated_rows if config.remove else 0,
              "pairs": pairs, "pairs_listed": len(pairs)}
    if contaminated_rows:
        log.warning("data: %d training rows share >= %.0f%% of an eval prompt's %d-grams (%d eval rows hit)%s",
                    contaminated_rows, 100 * config.min_overlap, config.ngram, len(eval_hit), "; removed" if config.remove else "")
    return result


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def files_fingerprint(section: DataSection, train_path: Path, eval_path: Path) -> str:
    """sha256 over the data recipe and the canonical rows of each split (the files, byte for byte)."""
    digest = hashlib.sha256(section.model_dump_json(exclude={"workers"}).encode())
    for path in (train_path, eval_path):
        digest.update(f"\x00{path.stem}\x00{sha256_file(path)}".encode())
    return digest.hexdigest()


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The split prepare_data applies, for a list of canonical rows (used by tests and tools)."""
    train, evaluation = [], []
    for row in rows:
        key = xxhash.xxh3_64_intdigest(json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode())
        (evaluation if held_out(key, eval_fraction, seed) else train).append(row)
    return train, evaluation


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file this pipeline wrote."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_fingerprint(section: DataSection) -> str:
    """sha256 over the local source files' paths and bytes (remote and hub sources by name and revision):
    known before preparation, so it can name the run folder and key the cache."""
    from data_prep.sources import files_behind

    digest = hashlib.sha256()
    for source in [*section.sources, *section.eval_sources]:
        digest.update(f"{source.name}\x00{source.revision}\x00".encode())
        if source.path and "://" not in source.path:
            try:
                for file in files_behind(source.path):
                    digest.update(f"{file}\x00{sha256_file(Path(file))}\x00".encode())
            except DataError:
                digest.update(b"missing")  # the data stage reports it properly
    return digest.hexdigest()
