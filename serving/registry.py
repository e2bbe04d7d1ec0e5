"""The model registry: `<uri>/<model>/<version>/` folders holding artifacts, with movable aliases.

`uri` is a local folder or an fsspec URL (s3://, gs://, memory://, ...). A version is numbered 1, 2, ... and is
complete only once its `registered.json` exists: the artifact is copied into a hidden `.incoming-*` folder,
checked against the manifest's SHA-256s, moved to its number, and `registered.json` is written last. A copy
killed at any point leaves no folder that looks like a version. Aliases (`candidate`, `production`) and the
history of every move are entries of the model's hash-chained audit log (`<model>/audit.jsonl`, governance/audit.py),
as are registrations, gate results, policy changes and approval decisions; `aliases.json` is only a view of it for
readers that do not verify. A version counts once its `register` entry is in the log, which records the SHA-256 of its
manifest and `registered.json`: a registered version's files never change again, and `verify` finds any byte changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from governance import audit
from data_prep.files import atomic_write_bytes
from governance.policy import Policy

log = logging.getLogger(__name__)

CANDIDATE, PRODUCTION = "candidate", "production"
MARKER = "registered.json"
ALIASES = "aliases.json"
INCOMING = ".incoming-"
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # a recipe's name (recipes/schema.py Recipe.name)
APPROVED_OUTCOMES = ("approved", "not required")


def content_identity(manifest: dict) -> str:
    """The same recipe and the same files (weights, tokenizer, launch files) are the same version, whatever the card
    and the manifest gained after registration (the approval) or when the run started."""
    files = {name: digest for name, digest in manifest["files"].items() if name != "README.md"}
    return hashlib.sha256(json.dumps([manifest.get("recipe_hash"), files], sort_keys=True).encode()).hexdigest()


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why and what to do."""


@dataclass(frozen=True)
class Version:
    model: str
    version: str
    url: str  # the version folder, in the registry's own terms (path or URL)
    record: dict  # registered.json

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "url": self.url, **{k: self.record.get(k) for k in ("registered_at", "by")}}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, uri: str | Path):
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.uri = str(uri)
        self.fs, self.root = url_to_fs(self.uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = str(Path(self.root).resolve())

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ---- the audit log ---------------------------------------------------------------------------------------
    def events(self, model: str) -> list[audit.Entry]:
        """Every entry of the model's audit log, verified (AuditError names the first broken one)."""
        return audit.verified(self._log_bytes(model), self._path(checked_name(model), audit.LOG_NAME))

    def append(self, model: str, event: str, by: str, data: dict) -> audit.Entry:
        """Add one entry after the verified chain (serialised on a local registry; the whole log is replaced atomically)."""
        with self._locked(model):
            entries = self.events(model)
            entry = audit.new_entry(entries[-1] if entries else None, event, by, data)
            self._write_bytes(self._path(model, audit.LOG_NAME), audit.serialise([*entries, entry]))
            if event == "alias":
                self._write_json(self._path(model, ALIASES), {"aliases": self.aliases(model), "note": "a view of audit.jsonl; "
                                 "ftpipe reads the log, and `ftpipe registry verify` checks this file against it"})
        return entry

    def policy(self, model: str) -> Policy:
        """The model's promotion policy: the latest `policy` entry of its log (none yet: nothing beyond the recipe)."""
        latest = next((e for e in reversed(self.events(model)) if e.event == "policy"), None)
        return Policy.model_validate(latest.data["policy"]) if latest else Policy()

    def set_policy(self, model: str, policy: Policy, by: str, reason: str = "") -> audit.Entry:
        return self.append(model, "policy", by, {"policy": policy.model_dump(mode="json"), "reason": reason})

    def approval_outcome(self, model: str, version: str) -> dict | None:
        """The latest approval outcome recorded for a version (approved, rejected, timed out, not required), or None."""
        return next((e.data for e in reversed(self.events(model)) if e.event == "approval" and e.data.get("version") == str(version)), None)

    # ---- reading -------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self.root, detail=False) if self.fs.isdir(p) and not Path(p).name.startswith("."))

    def versions(self, model: str) -> list[Version]:
        """Versions whose registration is in the audit log, oldest first."""
        registered = [e.data["version"] for e in self.events(model) if e.event == "register"]
        return [v for v in (self._version(model, n) for n in registered) if v is not None]

    def incomplete(self, model: str) -> list[str]:
        """Folders left by interrupted copies (or never registered in the log): never versions, shown so they can go."""
        registered = {v.version for v in self.versions(model)}
        names = [Path(p).name for p in self._ls(model)]
        return sorted(n for n in names if n.startswith(INCOMING) or (n.isdigit() and n not in registered))

    def version(self, model: str, version: str) -> Version:
        found = next((v for v in self.versions(model) if v.version == str(version)), None)
        if found is None:
            known = ", ".join(v.version for v in self.versions(model)) or "none"
            raise RegistryError(f"{model} has no version {version!r} in {self.uri} (versions: {known})")
        return found

    def aliases(self, model: str) -> dict[str, str]:
        state: dict[str, str] = {}
        for move in self.history(model):
            state[move["alias"]] = move["version"]
        return state

    def history(self, model: str) -> list[dict]:
        return [{**e.data, "by": e.by, "at": e.at} for e in self.events(model) if e.event == "alias"]

    def resolve(self, model: str, alias: str) -> Version | None:
        version = self.aliases(model).get(alias)
        return self.version(model, version) if version else None

    def manifest(self, version: Version) -> dict:
        return json.loads(self.fs.cat_file(f"{version.url}/manifest.json"))

    def local_copy(self, version: Version, cache_dir: str | Path) -> Path:
        """The version as a local folder (itself for a local registry; downloaded once into cache_dir otherwise)."""
        if self.local:
            return Path(version.url)
        target = Path(cache_dir) / version.model / version.version
        if not (target / MARKER).is_file():
            staging = target.with_name(f"{INCOMING}{uuid.uuid4().hex}")
            self.fs.get(version.url.rstrip("/") + "/", str(staging), recursive=True)
            _replace_dir(staging, target)
        return target

    # ---- verification --------------------------------------------------------------------------------------
    def version_problems(self, version: Version) -> list[str]:
        """Every way the version's files differ from what its registration recorded (empty: intact)."""
        entry = next(e for e in self.events(version.model) if e.event == "register" and e.data["version"] == version.version)
        where = f"{version.model} version {version.version}"
        problems = [f"{where}: {name} changed since registration (SHA-256 differs from audit entry {entry.seq})"
                    for name, expected in ((MARKER, entry.data["registered_sha256"]), ("manifest.json", entry.data["manifest_sha256"]))
                    if self._sha256(f"{version.url}/{name}") != expected]
        if problems:
            return problems
        return [f"{where}: {problem}" for problem in self._file_problems(version.url, self.manifest(version))]

    def verify(self, model: str) -> list[str]:
        """The audit chain, every registered version's files, and the aliases view: one line per problem."""
        where = self._path(checked_name(model), audit.LOG_NAME)
        if not self.fs.exists(where):
            return [f"{where}: no audit log (a model registered before ftpipe kept one, or not a model)"]
        entries, problems = audit.parse(self._log_bytes(model), where)
        if problems:
            return problems
        for version in self.versions(model):
            problems += self.version_problems(version)
        problems += [f"{self._path(model, n)}: a version folder with no registration in the audit log" for n in self.incomplete(model)
                     if n.isdigit() and self.fs.exists(self._path(model, n, MARKER))]
        view = self._path(model, ALIASES)
        if self.fs.exists(view) and self._read_json(view).get("aliases") != self.aliases(model):
            problems.append(f"{view}: does not match the alias moves in the audit log (edited); the log is what counts")
        return problems

    # ---- writing -------------------------------------------------------------------------------------------
    def register(self, model: str, artifact: str | Path, by: str, alias: str | None = CANDIDATE) -> Version:
        """Copy a checked artifact in as the next version (or return the version already holding this exact artifact)
        and point `alias` at it. An artifact whose files fail its manifest's checksums is never registered, and an
        existing version whose files changed is never handed out again."""
        artifact = Path(artifact)
        manifest = json.loads((artifact / "manifest.json").read_bytes())
        if problems := self._file_problems(str(artifact), manifest, local=True):
            raise RegistryError(f"{artifact} is not registered: {problems[0]}; export it again (`ftpipe run --force`)")
        identity = content_identity(manifest)
        existing = next((v for v in self.versions(checked_name(model)) if v.record.get("content_sha256") == identity), None)
        if existing is not None and (problems := self.version_problems(existing)):
            raise RegistryError(f"{problems[0]}; `ftpipe registry verify {model}` lists every problem")
        if existing is None:
            existing = self._copy_in(model, artifact, manifest, identity, by)
        if alias and self.aliases(model).get(alias) != existing.version:
            self.set_alias(model, alias, existing.version, by, reason=f"registered from {artifact}")
        return existing

    def set_alias(self, model: str, alias: str, version: str, by: str, reason: str = "", rollback: bool = False) -> dict:
        """Point alias at a complete version, recording who, when, from which version and why (and whether it was a
        rollback, which is never a promotion to roll back to)."""
        self.version(model, version)
        previous = self.aliases(model).get(alias)
        data = {"alias": alias, "version": str(version), "previous": previous, "reason": reason} | ({"rollback": True} if rollback else {})
        entry = self.append(model, "alias", by, data)
        log.info("%s: %s %s -> %s by %s", model, alias, previous, version, by)
        return {**entry.data, "by": by, "at": entry.at}

    def promote(self, model: str, version: str, by: str, reason: str = "") -> dict | None:
        """Move production to a version whose latest approval outcome in the log is an approval (or "not required"
        while the policy requires none) and whose files are intact; None when it is production already."""
        if self.aliases(model).get(PRODUCTION) == str(version):
            return None
        self._require_intact(self.version(model, version))
        outcome = self.approval_outcome(model, version)
        if outcome is None or outcome["outcome"] not in APPROVED_OUTCOMES:
            state = "has no approval decision yet" if outcome is None else f"was {outcome['outcome']}"
            raise RegistryError(f"{model} version {version} {state}; only approved versions can be promoted "
                                f"(approve the paused run with `ftpipe approve`)")
        if outcome["outcome"] == "not required" and self.policy(model).require_approval:
            raise RegistryError(f"{model} version {version} was never approved (its run needed no approval) and the promotion "
                                "policy now requires approval: run the recipe again and approve that run")
        return self.set_alias(model, PRODUCTION, version, by, reason or "promoted")

    def previous_production(self, model: str, skip_rollbacks: bool = False) -> str:
        """The version production pointed at before the current one (RegistryError when there is none). With
        skip_rollbacks (monitoring's automatic rollback), a rollback's move is skipped: after rolling back from 2 to 1,
        the version before 1 is the one before 1's own promotion, never 2 again; a person's `registry rollback` may
        undo a rollback."""
        current = self.aliases(model).get(PRODUCTION)
        if current is None:
            raise RegistryError(f"{model} has no production version to roll back from")
        earlier = [m["previous"] for m in reversed(self.history(model)) if m["alias"] == PRODUCTION and m["version"] == current
                   and not (skip_rollbacks and m.get("rollback")) and m["previous"] not in (None, current)]
        if not earlier:
            raise RegistryError(f"{model}: production ({current}) has no earlier production version; give --to VERSION")
        return earlier[0]

    def rollback(self, model: str, by: str, to: str | None = None, reason: str = "") -> dict:
        """Move production back: to `to`, or to the version production pointed at before the current one."""
        current = self.aliases(model).get(PRODUCTION)
        if current is None:
            raise RegistryError(f"{model} has no production version to roll back from")
        to = to if to is not None else self.previous_production(model)
        if not any(m["alias"] == PRODUCTION and m["version"] == str(to) for m in self.history(model)):
            raise RegistryError(f"{model} version {to} was never in production; roll back only to a version that was "
                                "(use `ftpipe registry promote` for an approved new one)")
        self._require_intact(self.version(model, str(to)))
        return self.set_alias(model, PRODUCTION, str(to), by, reason or f"rollback from {current}", rollback=True)

    # ---- internals -----------------------------------------------------------------------------------------
    def _require_intact(self, version: Version) -> None:
        if problems := self.version_problems(version):
            raise RegistryError(f"{problems[0]}; a version whose files changed is never moved to production "
                                f"(`ftpipe registry verify {version.model}`)")

    def _log_bytes(self, model: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(checked_name(model), audit.LOG_NAME))
        except FileNotFoundError:
            return b""

    def _sha256(self, url: str) -> str | None:
        try:
            with self.fs.open(url, "rb") as f:
                digest = hashlib.sha256()
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
        except FileNotFoundError:
            return None

    def _file_problems(self, folder: str, manifest: dict, local: bool = False) -> list[str]:
        """Files the manifest lists that are missing or differ, and files it does not list (the manifest itself and
        registered.json aside)."""
        listed = manifest.get("files") or {}
        if local or self.local:
            from serving.checks import check_checksums

            return check_checksums(Path(folder), listed)
        base = folder.rstrip("/")
        present = {p[len(base) + 1:] for p in self.fs.find(base)}
        problems = [f"{name}: listed in manifest.json but missing" if name not in present else
                    f"{name}: SHA-256 differs from manifest.json (changed after export, or corrupt)"
                    for name, expected in listed.items() if self._sha256(f"{base}/{name}") != expected]
        return problems + [f"{name}: not listed in manifest.json (added after export)"
                           for name in sorted(present - set(listed) - {"manifest.json", MARKER})]

    def _ls(self, model: str) -> list[str]:
        folder = self._path(checked_name(model))
        return self.fs.ls(folder, detail=False) if self.fs.isdir(folder) else []

    def _numbers(self, model: str) -> list[int]:
        return sorted(int(Path(p).name) for p in self._ls(model) if Path(p).name.isdigit())

    def _version(self, model: str, version: str) -> Version | None:
        url = self._path(model, version)
        try:
            record = json.loads(self.fs.cat_file(f"{url}/{MARKER}"))
        except FileNotFoundError:
            return None
        except ValueError:
            record = {}  # edited or truncated: version_problems() names it, and nothing moves to it
        return Version(model=model, version=version, url=url, record=record)

    def _read_json(self, url: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(url))
        except ValueError:
            return {}

    def _copy_in(self, model: str, artifact: Path, manifest: dict, identity: str, by: str) -> Version:
        staging = self._path(model, f"{INCOMING}{uuid.uuid4().hex}")
        try:
            for path in sorted(p for p in artifact.rglob("*") if p.is_file()):
                target = f"{staging}/{path.relative_to(artifact).as_posix()}"
                self.fs.makedirs(target.rpartition("/")[0], exist_ok=True)
                self.fs.put_file(str(path), target)
            self._verify_copy(staging, manifest)
        except Exception:
            self.fs.rm(staging, recursive=True)  # a crash (SIGKILL) leaves it instead; incomplete() lists it
            raise
        record = {"model": model, "registered_at": now(), "by": by, "source": str(artifact), "content_sha256": identity,
                  "name": manifest.get("name"), "recipe_hash": manifest.get("recipe_hash"),
                  "data_fingerprint": (manifest.get("data") or {}).get("fingerprint"),
                  "base_model": (manifest.get("base_model") or {}).get("model_id")}
        number = (self._numbers(model) or [0])[-1] + 1
        while True:  # a concurrent registration may take the number first: the rename fails, take the next one
            final = self._path(model, str(number))
            try:
                self._move_dir(staging, final)
                break
            except OSError:
                if not self.fs.exists(final):
                    raise
                number += 1
        self._write_json(f"{final}/{MARKER}", {**record, "version": str(number)})
        self.append(model, "register", by, {"version": str(number), "content_sha256": identity, "source": str(artifact),
                                            "manifest_sha256": self._sha256(f"{final}/manifest.json"),
                                            "registered_sha256": self._sha256(f"{final}/{MARKER}"),
                                            "files": len(manifest.get("files") or {}), **{k: record[k] for k in
                                            ("recipe_hash", "data_fingerprint", "base_model")}})
        log.info("registered %s version %s from %s", model, number, artifact)
        return self.version(model, str(number))

    def _verify_copy(self, staging: str, manifest: dict) -> None:
        """Every file the manifest lists arrived with its SHA-256 (the manifest itself is not in its own list)."""
        for name, expected in (manifest.get("files") or {}).items():
            if self._sha256(f"{staging}/{name}") != expected:
                raise RegistryError(f"copy of {name} into the registry does not match the manifest's SHA-256")

    def _move_dir(self, source: str, target: str) -> None:
        if self.local:
            os.rename(source, target)  # atomic; fails when target exists and is not empty
        else:
            if self.fs.exists(target):
                raise FileExistsError(target)
            self.fs.mv(source, target, recursive=True)

    def _write_json(self, target: str, data: dict) -> None:
        self._write_bytes(target, (json.dumps(data, indent=2) + "\n").encode())

    def _write_bytes(self, target: str, payload: bytes) -> None:
        if self.local:
            atomic_write_bytes(Path(target), payload)
        else:  # an object store replaces an object in one PUT
            self.fs.pipe_file(target, payload)

    @contextlib.contextmanager
    def _locked(self, model: str):
        """Serialise log appends on a local registry (an object store gets last-writer-wins on audit.jsonl)."""
        if not self.local:
            yield
            return
        import fcntl

        folder = Path(self._path(checked_name(model)))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def checked_name(model: str) -> str:
    """A model name as a recipe's name is spelled: never a path (`../..`), so it stays inside the registry."""
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise RegistryError(f"model name {model!r}: use lowercase letters, digits, . _ - (a recipe's name), starting with a "
                            "letter or digit")
    return model


def _replace_dir(staging: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def registry_for(uri: str | None, output_dir: str | Path) -> Registry:
    """The recipe's registry, or <output_dir>/registry when it names none."""
    return Registry(uri if uri else Path(output_dir) / "registry")
