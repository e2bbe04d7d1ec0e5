"""The data stage: sources -> canonical rows -> validate/quarantine -> clean/redact/dedup -> split ->
contamination check -> (token-length filter) -> files and a report whose counts reconcile.

Rows stream through: files are read lazily, the per-row work runs in `data.workers` processes a few
chunks ahead of the writer, and only the de-duplication and contamination indexes stay in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import xxhash

from data_prep.dedup import ContaminationIndex, Deduplicator
from data_prep.files import atomic_write_json, sha256_file
from data_prep.readers import DataError, RawRow
from data_prep.rows import Processed, RowProcessor, RowSettings, init_worker, process_chunk
from data_prep.sources import iter_source
from recipes.schema import DataSection, DataSource

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024
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
    if reuse and (cached := load_prepared(out_dir, key)) is not None:
        log.info("data: reusing prepared data in %s (cache key %s)", out_dir, key[:12])
        return cached
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
            eval_dedup = Deduplicator(section.dedup)
            for source in section.eval_sources:
                counts.append(writer.consume(source, "eval", processor.run(source), eval_dedup))
        train_dedup = Deduplicator(section.dedup)
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
        self.pii_types = list(section.pii.types) if section.pii.redact else []
        self.num_perm = section.dedup.num_perm if section.dedup.near else None
        self.ngram = section.contamination.ngram if section.contamination.check else None
        self.pool = None

    def __enter__(self) -> "_Processor":
        if self.section.workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch threads
            self.pool = context.Pool(self.section.workers, initializer=init_worker, initargs=(self.pii_types, self.num_perm, self.ngram))
        else:
            self.local = RowProcessor(self.pii_types, self.num_perm, self.ngram)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def run(self, source: DataSource) -> Iterator[Processed]:
        settings = RowSettings(source.format, tuple(source.columns.items()), self.section.system_prompt,
                               self.section.system_prompt_mode, self.section.max_row_chars)
        chunks = ((chunk, settings) for chunk in _chunks(iter_source(source), CHUNK_ROWS))
        if self.pool is None:
            for chunk, _ in chunks:
                yield from self.local.chunk(chunk, settings)
            return
        pending: deque = deque()
        for item in chunks:  # a bounded window of chunks in flight keeps memory flat on any input size
            pending.append(self.pool.apply_async(process_chunk, (item,)))
            if len(pending) >= 2 * self.section.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _chunks(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


class _SplitWriter:
    """Decides each processed row's fate and writes it: quarantine, duplicate, train (with weight) or eval."""

    def __init__(self, section: DataSection, train_out, eval_out, quarantine, kinds: Counter, grams_out):
        self.section = section
        self.train_out, self.eval_out, self.quarantine, self.grams_out = train_out, eval_out, quarantine, grams_out
        self.kinds = kinds

    def consume(self, source: DataSource, role: str, rows: Iterator[Processed], dedup: Deduplicator) -> SourceCounts:
        count = SourceCounts(path=source.name, role=role)
        removed: Counter[str] = Counter()
        formats: Counter[str] = Counter()
        pii: Counter[str] = Counter()
        for item in rows:
            count.rows_in += 1
            if item.reason is not None:
                count.quarantined += 1
                self.quarantine.write(json.dumps({"source": item.source, "row": item.row, "reason": item.reason,
                                                  "record": item.record_preview}, ensure_ascii=False).encode() + b"\n")
                continue
            duplicate = dedup.check(item.key, item.signature)
            if duplicate:
                removed[duplicate] += 1
                continue
            count.kept += 1
            formats[item.fmt] += 1
            pii.update(item.pii)
            self.kinds[item.kind] += 1
            count.written += self._write(item, role, source.weight)
            if source.max_samples and count.kept >= source.max_samples:
                count.stopped_at_max_samples = True
                break
        count.removed, count.formats, count.pii_redacted = dict(removed), dict(formats), dict(pii)
        log.info("data: %s (%s): %d rows in, %d kept, %d quarantined, removed %s, pii %s", source.name, role,
                 count.rows_in, count.kept, count.quarantined, dict(removed), dict(pii))
        return count

    def _write(self, item: Processed, role: str, weight: float) -> int:
        line = item.line
        if role == "eval" or (role == "train+eval" and held_out(item.key, self.section.eval_fraction, self.section.seed)):
            self.eval_out.write(line)
            return 1
        copies = int(weight) + (1 if self._unit(item.key, "weight") < weight - int(weight) else 0)
        self.train_out.write(line * copies)
        if item.grams is not None:
            self.grams_out.write((np.uint32(len(item.grams) // 4).tobytes() + item.grams) * copies)
        return copies

    def _unit(self, key: int, purpose: str) -> float:
        return xxhash.xxh3_64_intdigest(f"{self.section.seed}:{purpose}:{key}".encode()) / 2**64


def held_out(key: int, eval_fraction: float, seed: int) -> bool:
    """Whether a row (by its content key) goes to eval: a hash of content and seed, so the split is stable
    under reordering and reruns."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()) < int(eval_fraction * 2**64)


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
        while lines := list(islice(src, CHUNK_ROWS)):
            for line, hits in zip(lines, index.overlaps([_read_grams(grams) for _ in lines]), strict=True):
                number += 1
                if hits:
                    contaminated_rows += 1
                    eval_hit.update(i for i, _ in hits)
                    pairs.extend({"train_row": number, "eval_row": i + 1, "overlap": share} for i, share in hits[: MAX_LISTED_PAIRS - len(pairs)])
                    if config.remove:
                        continue
                dst.write(line)
    staged_train.unlink()
    staged_grams.unlink()
    result = {"checked": True, "ngram": config.ngram, "min_overlap": config.min_overlap, "eval_rows_indexed": index.indexed,
              "contaminated_train_rows": contaminated_rows, "eval_rows_hit": len(eval_hit), "removed": contaminated_rows if config.remove else 0,
              "pairs": pairs, "pairs_listed": len(pairs)}
    if contaminated_rows:
        log.warning("data: %d training rows share >= %.0f%% of an eval prompt's %d-grams (%d eval rows hit)%s",
                    contaminated_rows, 100 * config.min_overlap, config.ngram, len(eval_hit), "; removed" if config.remove else "")
    return result


def _read_grams(f) -> np.ndarray:
    (count,) = np.frombuffer(f.read(4), dtype=np.uint32)
    return np.frombuffer(f.read(4 * int(count)), dtype=np.uint32)


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
