"""The model registry: `<uri>/<model>/<version>/` folders holding artifacts, with movable aliases.

`uri` is a local folder or an fsspec URL (s3://, gs://, memory://, ...). A version is numbered 1, 2, ... and is
complete only once its `registered.json` exists: the artifact is copied into a hidden `.incoming-*` folder,
checked against the manifest's SHA-256s, moved to its number, and `registered.json` is written last. A copy
killed at any point leaves no folder that looks like a version. Aliases (`candidate`, `production`) and the
history of every move live in `<model>/aliases.json`, rewritten whole, so an alias move is one atomic write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CANDIDATE, PRODUCTION = "candidate", "production"
MARKER = "registered.json"
ALIASES = "aliases.json"
INCOMING = ".incoming-"


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

    # ---- reading -------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self.root, detail=False) if self.fs.isdir(p) and not Path(p).name.startswith("."))

    def versions(self, model: str) -> list[Version]:
        """Complete versions, oldest first (a folder without registered.json is an interrupted copy and is ignored)."""
        return [v for v in (self._version(model, str(n)) for n in self._numbers(model)) if v is not None]

    def incomplete(self, model: str) -> list[str]:
        """Folders left by interrupted copies: never listed as versions, shown so they can be removed."""
        names = [Path(p).name for p in self._ls(model)]
        return sorted(n for n in names if n.startswith(INCOMING) or (n.isdigit() and not self.fs.exists(self._path(model, n, MARKER))))

    def version(self, model: str, version: str) -> Version:
        found = self._version(model, str(version)) if str(version).isdigit() else None
        if found is None:
            known = ", ".join(v.version for v in self.versions(model)) or "none"
            raise RegistryError(f"{model} has no version {version!r} in {self.uri} (versions: {known})")
        return found

    def aliases(self, model: str) -> dict[str, str]:
        return self._alias_file(model)["aliases"]

    def history(self, model: str) -> list[dict]:
        return self._alias_file(model)["history"]

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

    # ---- writing -------------------------------------------------------------------------------------------
    def register(self, model: str, artifact: str | Path, by: str, alias: str | None = CANDIDATE) -> Version:
        """Copy a checked artifact in as the next version (or return the version already holding this exact artifact)
        and point `alias` at it."""
        artifact = Path(artifact)
        manifest = json.loads((artifact / "manifest.json").read_bytes())
        identity = content_identity(manifest)
        existing = next((v for v in self.versions(model) if v.record.get("content_sha256") == identity), None)
        if existing is None:
            existing = self._copy_in(model, artifact, manifest, identity, by)
        if alias and self.aliases(model).get(alias) != existing.version:
            self.set_alias(model, alias, existing.version, by, reason=f"registered from {artifact}")
        return existing

    def update_files(self, version: Version, artifact: str | Path, names: tuple[str, ...] = ("README.md", "manifest.json")) -> None:
        """Replace files that change after registration (the card and manifest gain the approval), each atomically,
        the manifest last so its checksums never describe a card that is not there yet."""
        for name in names:
            self._put_atomic(Path(artifact) / name, f"{version.url}/{name}")

    def set_alias(self, model: str, alias: str, version: str, by: str, reason: str = "") -> dict:
        """Point alias at a complete version, recording who, when, from which version and why."""
        self.version(model, version)
        with self._locked(model):
            state = self._alias_file(model)
            previous = state["aliases"].get(alias)
            state["aliases"][alias] = str(version)
            move = {"alias": alias, "version": str(version), "previous": previous, "by": by, "at": now(), "reason": reason}
            state["history"].append(move)
            self._write_json(self._path(model, ALIASES), state)
        log.info("%s: %s %s -> %s by %s", model, alias, previous, version, by)
        return move

    def promote(self, model: str, version: str, by: str, reason: str = "") -> dict | None:
        """Move production to a version a reviewer approved (or one that needed no approval); None when it is
        production already (a re-run of an unchanged recipe), so the history records only real moves."""
        if self.aliases(model).get(PRODUCTION) == str(version):
            return None
        approval = self.manifest(self.version(model, version)).get("approval")
        if not approval or not approval.get("promoted"):
            state = "has no approval decision yet" if not approval else f"was {approval['decision']}"
            raise RegistryError(f"{model} version {version} {state}; only approved versions can be promoted "
                                f"(approve the paused run with `ftpipe approve`)")
        return self.set_alias(model, PRODUCTION, version, by, reason or "promoted")

    def rollback(self, model: str, by: str, to: str | None = None, reason: str = "") -> dict:
        """Move production back: to `to`, or to the version production pointed at before the current one."""
        current = self.aliases(model).get(PRODUCTION)
        if current is None:
            raise RegistryError(f"{model} has no production version to roll back from")
        if to is None:
            earlier = [m["previous"] for m in reversed(self.history(model))
                       if m["alias"] == PRODUCTION and m["version"] == current and m["previous"] not in (None, current)]
            if not earlier:
                raise RegistryError(f"{model}: production ({current}) has no earlier production version; give --to VERSION")
            to = earlier[0]
        if not any(m["alias"] == PRODUCTION and m["version"] == str(to) for m in self.history(model)):
            raise RegistryError(f"{model} version {to} was never in production; roll back only to a version that was "
                                "(use `ftpipe registry promote` for an approved new one)")
        return self.set_alias(model, PRODUCTION, str(to), by, reason or f"rollback from {current}")

    # ---- internals -----------------------------------------------------------------------------------------
    def _ls(self, model: str) -> list[str]:
        folder = self._path(model)
        return self.fs.ls(folder, detail=False) if self.fs.isdir(folder) else []

    def _numbers(self, model: str) -> list[int]:
        return sorted(int(Path(p).name) for p in self._ls(model) if Path(p).name.isdigit())

    def _version(self, model: str, version: str) -> Version | None:
        url = self._path(model, version)
        try:
            record = json.loads(self.fs.cat_file(f"{url}/{MARKER}"))
        except FileNotFoundError:
            return None
        return Version(model=model, version=version, url=url, record=record)

    def _alias_file(self, model: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._path(model, ALIASES)))
        except FileNotFoundError:
            return {"aliases": {}, "history": []}

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
        log.info("registered %s version %s from %s", model, number, artifact)
        return self.version(model, str(number))

    def _verify_copy(self, staging: str, manifest: dict) -> None:
        """Every file the manifest lists arrived with its SHA-256 (the manifest itself is not in its own list)."""
        for name, expected in (manifest.get("files") or {}).items():
            digest = hashlib.sha256()
            with self.fs.open(f"{staging}/{name}", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != expected:
                raise RegistryError(f"copy of {name} into the registry does not match the manifest's SHA-256")

    def _move_dir(self, source: str, target: str) -> None:
        if self.local:
            os.rename(source, target)  # atomic; fails when target exists and is not empty
        else:
            if self.fs.exists(target):
                raise FileExistsError(target)
            self.fs.mv(source, target, recursive=True)

    def _put_atomic(self, local_file: Path, target: str) -> None:
        if self.local:
            from data_prep.files import atomic_write_bytes

            atomic_write_bytes(Path(target), local_file.read_bytes())
        else:  # an object store replaces an object in one PUT
            self.fs.put_file(str(local_file), target)

    def _write_json(self, target: str, data: dict) -> None:
        payload = (json.dumps(data, indent=2) + "\n").encode()
        if self.local:
            from data_prep.files import atomic_write_bytes

            atomic_write_bytes(Path(target), payload)
        else:
            self.fs.pipe_file(target, payload)

    @contextlib.contextmanager
    def _locked(self, model: str):
        """Serialise alias moves on a local registry (object stores get last-writer-wins on aliases.json)."""
        if not self.local:
            yield
            return
        import fcntl

        folder = Path(self._path(model))
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_dir(staging: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def registry_for(uri: str | None, output_dir: str | Path) -> Registry:
    """The recipe's registry, or <output_dir>/registry when it names none."""
    return Registry(uri if uri else Path(output_dir) / "registry")
