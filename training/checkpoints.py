"""Checkpoints that can be trusted after a crash.

The Trainer writes a checkpoint's files one after another, so a process killed mid-save leaves a folder
that looks like a checkpoint but is not one. After the Trainer has finished a checkpoint, `seal` writes
a manifest with each file's size and sha256, atomically; a checkpoint counts only when its manifest is
there and every file still matches. `latest_good` walks back from the newest checkpoint past partial or
corrupt ones (renamed aside, with a warning, so the Trainer's rotation never picks them up).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from data_prep.files import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

SEAL = "ftpipe-checkpoint.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def seal(checkpoint: Path) -> None:
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != SEAL)
    atomic_write_json(checkpoint / SEAL, {
        "step": step_of(checkpoint),
        "files": {str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    })


def step_of(checkpoint: Path) -> int:
    match = _STEP.match(checkpoint.name)
    if not match:
        raise ValueError(f"{checkpoint}: not a checkpoint folder (checkpoint-<step>)")
    return int(match.group(1))


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it can)."""
    try:
        manifest = json.loads((checkpoint / SEAL).read_text())
    except FileNotFoundError:
        return "never finished (no manifest: the process stopped while saving it)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("step") != step_of(checkpoint):
        return f"manifest is for step {manifest.get('step')}"
    for name, expected in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_good(folder: Path) -> tuple[Path, int] | None:
    """The newest checkpoint that can be resumed from, and its step; bad newer ones are set aside."""
    if not folder.is_dir():
        return None
    checkpoints = sorted((p for p in folder.iterdir() if p.is_dir() and _STEP.match(p.name)), key=step_of, reverse=True)
    for checkpoint in checkpoints:
        reason = problem(checkpoint)
        if reason is None:
            return checkpoint, step_of(checkpoint)
        aside = checkpoint.with_name(f"bad-{checkpoint.name}")
        log.warning("skipping %s: %s; set aside as %s, trying the previous checkpoint", checkpoint.name, reason, aside.name)
        if aside.exists():
            shutil.rmtree(aside)
        checkpoint.rename(aside)
    return None
