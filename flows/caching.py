"""Cache keys and retry rules for the stage tasks.

A stage's key is its name, the code version, the folder that holds run folders, the recipe sections it reads and
the results of the stages before it. So an unchanged recipe re-uses every stage (tasks end Cached), and changing a
gate threshold re-runs only the gate and what follows. Results persist in Prefect's result storage, configured once:
`PREFECT_LOCAL_STORAGE_PATH` (a local folder, the default `~/.prefect/storage`) or `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`
(a `remote-file-system` block with an fsspec URL, for workers on several machines).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

log = logging.getLogger(__name__)

PACKAGES = ("recipes", "data_prep", "training", "evaluation", "serving", "governance", "flows")
CODE_SUFFIXES = (".py", ".jinja", ".json", ".jsonl", ".yaml")
STALE_KEYS_TRIED = 8  # a cached result whose files were deleted is replaced under `<key>-1`, `<key>-2`, ...
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@cache
def code_version() -> str:
    """SHA-256 over the project's source files: a code change invalidates every cached stage."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """Stage inputs as plain JSON: recipe sections, result dataclasses, paths."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _names_a_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/") and "\n" not in value


def location_free(value: Any) -> Any:
    """An upstream result as it counts for a key: what it holds, not where it was written or whether the stage reused
    its files. Two runs that prepared the same data into their own folders (at the same time, say) then share the
    stages after it, whichever of their results the cache kept."""
    if isinstance(value, dict):
        return {k: location_free(v) for k, v in value.items() if k != "reused"}
    if isinstance(value, list):
        return [location_free(v) for v in value]
    if _names_a_path(value):
        return Path(value).name
    return value


def missing_files(result: Any) -> list[str]:
    """Absolute paths a stage result names that no longer exist (a run folder was deleted)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif _names_a_path(value) and not Path(value).exists():
            found.append(value)

    walk(jsonable(result))
    return found


@dataclass
class StageCache(CachePolicy):
    """Key = task name + code version + the flow's output folder + the recipe sections the stage reads (`"*"`: all of
    it), minus the listed fields, + every other input but `ignore` (the previous stages' results). `run_dir` does not
    count: a run folder is named after the whole recipe, and a stage that reads less is shared between run folders."""

    sections: dict[str, set[str]] = field(default_factory=dict)
    ignore: set[str] = field(default_factory=set)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        output_root = Path(flow_parameters.get("output_dir") or "runs").resolve()  # each output folder caches apart
        key = stage_key(task_ctx.task.name, self.sections, {k: v for k, v in inputs.items() if k not in self.ignore}, output_root)
        return usable_key(task_ctx.result_store, key)


def stage_key(name: str, sections: dict[str, set[str]], inputs: dict[str, Any], output_root: Path | None = None) -> str:
    recipe = inputs.get("recipe")
    parts: dict[str, Any] = {"task": name, "code": code_version(), "output_root": str(output_root)}
    for section, excluded in sections.items():
        owner = recipe if section == "*" else getattr(recipe, section)
        parts[f"recipe.{section}"] = owner.model_dump(mode="json", exclude=excluded or None)
    for input_name, value in inputs.items():
        if input_name not in ("recipe", "run_dir"):
            parts[input_name] = location_free(jsonable(value))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def usable_key(store, key: str) -> str | None:
    """The key itself, unless its cached result points at deleted files: then the first unused or valid successor."""
    for attempt in range(STALE_KEYS_TRIED):
        candidate = key if attempt == 0 else f"{key}-{attempt}"
        if not store.exists(candidate):
            return candidate
        result = store.read(candidate).result
        why = [f"{path} no longer exists" for path in missing_files(result)] or _changed_files(result)
        if not why:
            return candidate
        log.info("cached result %s is stale (%s): running the stage again", candidate, why[0])
    return None


def _changed_files(result: Any) -> list[str]:
    """What a result that can check its own files (an exported artifact against its checksums) finds changed."""
    check = getattr(result, "integrity_problems", None)
    return check() if callable(check) else []


def transient_failure(task, task_run, state) -> bool:
    """Retry I/O and network failures (a storage hiccup, a timeout, a dropped connection), never a bad input,
    a failed gate or a bug: those fail the same way again."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, NOT_TRANSIENT):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError)) or type(error).__module__.startswith(("httpx", "httpcore"))


RETRIES = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": transient_failure}
