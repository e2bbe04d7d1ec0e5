"""Crash-safe file writing and checksums shared by every stage.

A file is written under a temporary name in the same folder and renamed into place, so a crash never
leaves a half-written file that looks whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: Path, text: str | Iterable[str]) -> None:
    with _atomic_open(path, "w") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def _atomic_open(path: Path, mode: str):
    """A file handle on a temporary name in the target folder, renamed over path when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def jsonl_lines(rows: Iterable[dict]) -> Iterable[str]:
    return (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, keyed by its relative path."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
