"""The release watcher's decisions: has a candidate base appeared or changed, and does its tuned model beat production
on the recipe's objective beyond noise (and at what cost)? Plain functions; flows/releases.py runs them on a schedule.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from evaluation.confidence import describe
from evaluation.costs import self_hosted_per_1k
from evaluation.leaderboard import higher_is_better
from recipes.schema import TINY_PREFIX

COMMIT = re.compile(r"^[0-9a-f]{40}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
EDGE = 1 << 20  # bytes hashed at each end of a weight file


def base_fingerprint(base: str) -> str:
    """What identifies a base's release: a local folder's files (config, tokenizer and template in full; each weight
    file's size and its first and last MiB), a hub id's commit (a pinned 40-hex revision as given, else the commit
    the hub resolves the revision to), tiny:<family> by name (built from the recipe's data, never released)."""
    model_id, _, revision = base.partition("@")
    if model_id.startswith(TINY_PREFIX):
        return model_id
    folder = Path(model_id)
    if folder.is_dir():
        return "sha256:" + folder_digest(folder)
    if COMMIT.match(revision):
        return f"commit:{revision}"
    from huggingface_hub import HfApi

    try:
        return "commit:" + HfApi().model_info(model_id, revision=revision or None).sha
    except Exception as exc:  # offline, unknown id, gated: the base cannot be checked this run
        raise ValueError(f"compare.bases: cannot resolve {base!r} on the hub to a commit: {type(exc).__name__}: {exc}") from None


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\x00")
        with path.open("rb") as handle:
            if path.suffix in WEIGHT_SUFFIXES and path.stat().st_size > 2 * EDGE:
                digest.update(str(path.stat().st_size).encode() + handle.read(EDGE))
                handle.seek(-EDGE, 2)
                digest.update(handle.read(EDGE))
            else:
                digest.update(handle.read())
    return digest.hexdigest()


def last_seen(entries: list) -> dict[str, str]:
    """Each base's fingerprint as the latest release check recorded it (audit log `release_check` entries)."""
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.event == "release_check":
            seen |= entry.data["checked"]
    return seen


def review_verdict(best: dict | None, ranked: list[dict], objective: str, production: dict | None) -> tuple[bool, str]:
    """(open a review?, why) for the best tuned candidate against production: better on the objective beyond noise,
    i.e. the paired interval of its delta against production lies entirely on the better side of zero."""
    if production is None:
        return False, "no production version to compare with (register and promote one first)"
    if best is None:
        return False, "no candidate can be best: " + "; ".join(f"{r['base']}: {r['why_not']}" for r in ranked if r.get("why_not"))
    found = best.get("objective_vs_champion")
    if found is None:
        return False, f"{best['base']}: production was not evaluated on the same rows (no paired interval for {objective})"
    better = found["low"] > 0 if higher_is_better(objective) else found["high"] < 0
    shown = f"{objective} vs production {describe(found)}"
    if not better:
        return False, f"{best['base']}: not better than production beyond noise ({shown})"
    return True, f"{best['base']}: better than production beyond noise ({shown})"


def cost_difference(best: dict | None, production_manifest: dict | None) -> dict:
    """USD per 1,000 requests (serving projection) of the best candidate and of production, and what it cost to train."""
    if best is None:
        return {}
    theirs = self_hosted_per_1k((production_manifest or {}).get("cost", {}).get("serving"))
    mine = best.get("usd_per_1k_requests")
    return {"candidate_usd_per_1k_requests": mine, "production_usd_per_1k_requests": theirs,
            "difference_usd_per_1k_requests": round(mine - theirs, 6) if mine is not None and theirs is not None else None,
            "candidate_training_usd": best.get("cost_usd")}
