"""The data stage: sources -> canonical chat rows -> quarantine -> deterministic split -> files + report."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.formats import RowError, to_messages
from data_prep.readers import DataError, read_rows
from recipes.schema import DataSection, DataSource
from data_prep.files import atomic_write_text, jsonl_lines

log = logging.getLogger(__name__)


@dataclass
class SourceCounts:
    path: str
    rows_in: int = 0
    kept: int = 0
    quarantined: int = 0
    formats: dict[str, int] = field(default_factory=dict)


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

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_json(messages: list[dict[str, str]]) -> str:
    return json.dumps({"messages": messages}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prepare_data(section: DataSection, out_dir: str | Path) -> PreparedData:
    """Read every source, quarantine bad rows, split, and write train/eval/quarantine JSONL and a report."""
    out_dir = Path(out_dir)
    quarantine: list[dict] = []
    train_rows, train_counts = _load_sources(section.sources, section, quarantine)
    if section.eval_sources:
        eval_rows, eval_counts = _load_sources(section.eval_sources, section, quarantine)
    else:
        train_rows, eval_rows = split_rows(train_rows, section.eval_fraction, section.seed)
        eval_counts = []
    counts = train_counts + eval_counts
    _check_invalid_fraction(counts, section.max_invalid_fraction, out_dir / "quarantine.jsonl")
    if not train_rows:
        raise DataError("no training rows left after validation and split; see quarantine.jsonl")
    if not eval_rows:
        raise DataError("no evaluation rows: add eval_sources or raise data.eval_fraction")

    fingerprint = data_fingerprint(section, train_rows, eval_rows)
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "eval", "quarantine")}
    atomic_write_text(paths["train"], jsonl_lines(train_rows))
    atomic_write_text(paths["eval"], jsonl_lines(eval_rows))
    atomic_write_text(paths["quarantine"], jsonl_lines(quarantine))
    result = PreparedData(
        train_path=str(paths["train"]),
        eval_path=str(paths["eval"]),
        quarantine_path=str(paths["quarantine"]),
        report_path=str(out_dir / "report.json"),
        fingerprint=fingerprint,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        quarantined_rows=len(quarantine),
        sources=counts,
    )
    atomic_write_text(Path(result.report_path), json.dumps(result.to_dict(), indent=2) + "\n")
    log.info("data: %d train, %d eval, %d quarantined rows; fingerprint %s", len(train_rows), len(eval_rows), len(quarantine), fingerprint[:12])
    return result


def _load_sources(sources: list[DataSource], section: DataSection, quarantine: list[dict]) -> tuple[list[dict], list[SourceCounts]]:
    rows: list[dict] = []
    counts: list[SourceCounts] = []
    for source in sources:
        count = SourceCounts(path=source.path)
        formats: Counter[str] = Counter()
        for raw in read_rows(source.path):
            count.rows_in += 1
            try:
                if raw.error:
                    raise RowError(raw.error)
                messages = to_messages(raw.record, source.format, section.system_prompt)
            except RowError as exc:
                count.quarantined += 1
                quarantine.append({"source": raw.source, "row": raw.row, "reason": str(exc), "record": raw.record})
                continue
            formats[_format_of(raw.record)] += 1
            rows.append({"messages": messages})
            count.kept += 1
        if count.rows_in == 0:
            raise DataError(f"{source.path}: file has no rows")
        count.formats = dict(formats)
        log.info("data: %s: %d rows, %d kept, %d quarantined, formats %s", source.path, count.rows_in, count.kept, count.quarantined, dict(formats))
        counts.append(count)
    return rows, counts


def _format_of(record: dict) -> str:
    return "chat" if "messages" in record else "alpaca" if "instruction" in record else "completion"


def _check_invalid_fraction(counts: list[SourceCounts], limit: float, quarantine_path: Path) -> None:
    total = sum(c.rows_in for c in counts)
    bad = sum(c.quarantined for c in counts)
    if total and bad / total > limit:
        worst = max(counts, key=lambda c: c.quarantined / max(c.rows_in, 1))
        raise DataError(
            f"{bad} of {total} rows ({bad / total:.1%}) are invalid, above data.max_invalid_fraction={limit:g}; "
            f"worst source {worst.path} ({worst.quarantined}/{worst.rows_in}); reasons in {quarantine_path}"
        )


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Assign each row by a hash of its content and the seed: stable under reordering and reruns."""
    train, held_out = [], []
    threshold = int(eval_fraction * 2**64)
    for row in rows:
        digest = hashlib.sha256(f"{seed}\x00{canonical_json(row['messages'])}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") < threshold else train).append(row)
    return train, held_out


def data_fingerprint(section: DataSection, train_rows: list[dict], eval_rows: list[dict]) -> str:
    """sha256 over the data recipe and the canonical rows of each split, in order."""
    digest = hashlib.sha256()
    digest.update(section.model_dump_json().encode())
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        digest.update(f"\x00{name}\x00".encode())
        for row in rows:
            digest.update(canonical_json(row["messages"]).encode() + b"\n")
    return digest.hexdigest()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file this pipeline wrote."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_fingerprint(section: DataSection) -> str:
    """sha256 over the source files' paths and bytes: known before preparation, so it can name the run folder."""
    from data_prep.files import sha256_file

    digest = hashlib.sha256()
    for source in [*section.sources, *section.eval_sources]:
        path = Path(source.path)
        digest.update(f"{source.path}\x00{sha256_file(path) if path.is_file() else 'missing'}\x00".encode())
    return digest.hexdigest()
