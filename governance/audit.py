"""The append-only, hash-chained audit log of one registered model (`<registry>/<model>/audit.jsonl`).

Each line is one event (register, gates, policy, approval request, decision, refused decision, approval outcome,
alias move, monitoring run, release check). An entry carries the SHA-256 of the entry before it and its own SHA-256
over its canonical JSON, so an
edited, removed, re-ordered or inserted entry breaks the chain at that entry. Aliases, policy and approvals are read
from the log, never from files beside it; a log that does not verify is refused for every decision, naming the first
broken entry. A whole chain rewritten from scratch still verifies on its own: an auditor who noted an entry's hash
(`ftpipe registry verify` prints the head) checks with `--head HASH` that the log still holds that entry.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
EVENTS = ("register", "gates", "policy", "approval_requested", "decision", "decision_refused", "approval", "alias", "monitoring",
          "release_check")


class AuditError(RuntimeError):
    """The audit log does not verify (or cannot be read); the message names the file and the first broken entry."""


@dataclass(frozen=True)
class Entry:
    seq: int
    at: str
    event: str
    by: str
    data: dict
    prev: str
    hash: str

    def to_dict(self) -> dict:
        return {"seq": self.seq, "at": self.at, "event": self.event, "by": self.by, "data": self.data, "prev": self.prev, "hash": self.hash}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def entry_hash(body: dict) -> str:
    """SHA-256 over the entry without its own hash, keys sorted, no whitespace: the same bytes on every machine."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "hash"}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_entry(previous: Entry | None, event: str, by: str, data: dict) -> Entry:
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}; one of: {', '.join(EVENTS)}")
    body = {"seq": previous.seq + 1 if previous else 1, "at": utc_now(), "event": event, "by": by, "data": data,
            "prev": previous.hash if previous else GENESIS}
    return Entry(**body, hash=entry_hash(body))


def line_of(entry: Entry) -> bytes:
    return json.dumps(entry.to_dict(), sort_keys=True, ensure_ascii=False).encode() + b"\n"


def serialise(entries: list[Entry]) -> bytes:
    return b"".join(line_of(e) for e in entries)


def parse(payload: bytes, where: str) -> tuple[list[Entry], list[str]]:
    """The entries up to the first broken one, and the problems found (empty when the whole chain verifies). A line
    must be exactly the entry's own serialisation, so no byte of the file can change unnoticed (whitespace included)."""
    entries: list[Entry] = []
    previous_hash = GENESIS
    lines = payload.split(b"\n")
    for number, line in enumerate(lines[:-1] + ([lines[-1]] if lines[-1] else []), start=1):
        try:
            body = json.loads(line)
            entry = Entry(**{k: body[k] for k in ("seq", "at", "event", "by", "data", "prev", "hash")})
            if line_of(entry) != line + b"\n" or (number == len(lines) and lines[-1]):
                raise ValueError("not in canonical form, or no final newline")
        except (ValueError, KeyError, TypeError):
            return entries, [f"{where} line {number}: not an audit entry (truncated or edited); the entries before it verify"]
        label = f"{where} entry {number} ({entry.event} at {entry.at})"
        if entry.seq != number:
            return entries, [f"{label}: numbered {entry.seq}, expected {number} (an entry was removed or inserted)"]
        if entry.prev != previous_hash:
            return entries, [f"{label}: does not follow entry {number - 1} (an entry before it was removed, re-ordered or edited)"]
        if entry_hash(body) != entry.hash:
            return entries, [f"{label}: edited after it was written (its SHA-256 does not match)"]
        entries.append(entry)
        previous_hash = entry.hash
    return entries, []


def verified(payload: bytes, where: str) -> list[Entry]:
    """Every entry, or AuditError naming the first broken one: no decision is taken on a log that does not verify."""
    entries, problems = parse(payload, where)
    if problems:
        raise AuditError(f"{problems[0]}; nothing is decided on a broken audit log (`ftpipe registry verify` lists every problem)")
    return entries
