"""The model registry: versions, aliases with history, promotion rules, crash-safe copies, and `ftpipe registry`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.files import checksums
from governance.runs import local_login
from serving.registry import CANDIDATE, PRODUCTION, Registry, RegistryError
from tests.conftest import ROOT, run_ftpipe

APPROVED = {"outcome": "approved", "approvers": [{"reviewer": "alice", "credential_id": "cred-1"}]}
REJECTED = {"outcome": "rejected", "approvers": []}


def make_artifact(folder: Path, tag: str, shards: int = 2) -> Path:
    """An artifact folder as export writes it: files, then a manifest listing their SHA-256s."""
    (folder / "model").mkdir(parents=True)
    for i in range(shards):
        (folder / "model" / f"model-{i:05d}.safetensors").write_bytes(tag.encode() * 50_000)
    (folder / "README.md").write_text(f"card {tag}\n")
    manifest = {"name": "tickets", "tag": tag, "files": checksums(folder), "evaluation": {"candidate": {"exact_match": 0.9}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def register(registry: Registry, folder: Path, tag: str, outcome: dict | None = None, **kwargs) -> str:
    """Register an artifact and, as a run's promote step does, record its approval outcome in the audit log."""
    version = registry.register("tickets", make_artifact(folder, tag, **kwargs), by="ci").version
    if outcome:
        registry.append("tickets", "approval", "flow run test", {"version": version, **outcome})
    return version


def test_versions_are_numbered_and_an_identical_artifact_is_not_copied_twice(tmp_path):
    registry = Registry(tmp_path / "registry")
    first = registry.register("tickets", make_artifact(tmp_path / "a", "a"), by="run 1")
    again = registry.register("tickets", tmp_path / "a", by="run 1 retried")
    second = registry.register("tickets", make_artifact(tmp_path / "b", "b"), by="run 2")
    assert (first.version, again.version, second.version) == ("1", "1", "2")
    assert registry.aliases("tickets") == {CANDIDATE: "2"}
    assert [(m["alias"], m["previous"], m["version"], m["by"]) for m in registry.history("tickets")] == [
        (CANDIDATE, None, "1", "run 1"), (CANDIDATE, "1", "2", "run 2")]
    copied = Path(second.url)
    assert checksums(copied) | {} == {**checksums(tmp_path / "b"), "registered.json": checksums(copied)["registered.json"]}
    assert json.loads((copied / "registered.json").read_text())["by"] == "run 2"


def test_only_approved_versions_are_promoted_and_rollback_returns_to_the_previous_production(tmp_path):
    registry = Registry(tmp_path / "registry")
    for tag, outcome in (("a", APPROVED), ("b", REJECTED), ("c", None), ("d", APPROVED)):
        register(registry, tmp_path / tag, tag, outcome)
    with pytest.raises(RegistryError, match=r"^tickets has no production version to roll back from"):
        registry.rollback("tickets", by="oncall")
    registry.promote("tickets", "1", by="alice")
    with pytest.raises(RegistryError, match=r"production \(1\) has no earlier production version; give --to VERSION"):
        registry.rollback("tickets", by="oncall")
    with pytest.raises(RegistryError, match=r"^tickets version 2 was rejected; only approved versions can be promoted"):
        registry.promote("tickets", "2", by="bob")
    with pytest.raises(RegistryError, match=r"^tickets version 3 has no approval decision yet"):
        registry.promote("tickets", "3", by="bob")
    with pytest.raises(RegistryError, match=r"^tickets has no version '9' in .* \(versions: 1, 2, 3, 4\)"):
        registry.promote("tickets", "9", by="bob")
    registry.promote("tickets", "4", by="alice", reason="better routing")
    assert registry.aliases("tickets") == {CANDIDATE: "4", PRODUCTION: "4"}
    back = registry.rollback("tickets", by="oncall")
    assert (back["previous"], back["version"], back["reason"]) == ("4", "1", "rollback from 4")
    with pytest.raises(RegistryError, match="version 3 was never in production"):
        registry.rollback("tickets", by="oncall", to="3")
    assert registry.rollback("tickets", by="oncall")["version"] == "4"  # undoing the rollback: 4 held production before 1
    assert registry.rollback("tickets", by="oncall", to="1")["version"] == "1"
    assert [m["by"] for m in registry.history("tickets") if m["alias"] == PRODUCTION] == ["alice", "alice", "oncall", "oncall", "oncall"]


def test_an_fsspec_url_registry_works_like_a_folder(tmp_path):
    registry = Registry(f"memory://{tmp_path.name}/registry")
    version = registry.version("tickets", register(registry, tmp_path / "a", "a", APPROVED))
    registry.promote("tickets", version.version, by="alice")
    assert registry.resolve("tickets", PRODUCTION).version == "1"
    local = registry.local_copy(version, tmp_path / "cache")
    assert checksums(local / "model") == checksums(tmp_path / "a" / "model")
    assert json.loads((local / "manifest.json").read_text())["tag"] == "a"


def test_a_corrupted_copy_is_refused(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry")
    artifact = make_artifact(tmp_path / "a", "a")
    original = registry.fs.put_file

    def corrupting_put(source, target, **kwargs):
        original(source, target, **kwargs)
        if target.endswith("model-00001.safetensors"):
            Path(target).write_bytes(b"truncated")

    monkeypatch.setattr(registry.fs, "put_file", corrupting_put)
    with pytest.raises(RegistryError, match="copy of model/model-00001.safetensors into the registry does not match the manifest's SHA-256"):
        registry.register("tickets", artifact, by="ci")
    assert registry.versions("tickets") == [] and registry.incomplete("tickets") == []


KILLER = """
import os, signal, sys
from serving.registry import Registry
registry = Registry(sys.argv[1])
point, count = sys.argv[3], {"n": 0}
target = {"copy": "put_file", "rename": "_move_dir"}[point]
owner = registry.fs if point == "copy" else registry
original = getattr(owner, target)

def then_die(*args, **kwargs):
    original(*args, **kwargs)
    count["n"] += 1
    if count["n"] == 2 or point == "rename":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a crash or an OOM kill

setattr(owner, target, then_die)
registry.register("tickets", sys.argv[2], by="doomed")
"""


@pytest.mark.parametrize("kill_point", ["copy", "rename"])
def test_a_copy_killed_midway_never_looks_like_a_version(tmp_path, kill_point):
    """SIGKILL the registering process after two files were copied, or after the folder got its number but before
    registered.json: the registry lists no new version, says what is left over, and the next registration works."""
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a", APPROVED)
    registry.promote("tickets", "1", by="alice")
    killed = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "registry"), str(make_artifact(tmp_path / "b", "b", shards=6)),
                             kill_point], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert [v.version for v in registry.versions("tickets")] == ["1"]
    assert registry.aliases("tickets") == {CANDIDATE: "1", PRODUCTION: "1"}
    leftover = registry.incomplete("tickets")
    assert len(leftover) == 1 and (leftover[0].startswith(".incoming-") if kill_point == "copy" else leftover == ["2"])
    listed = run_ftpipe("registry", "list", "tickets", "--registry", str(tmp_path / "registry"))
    assert f"ignored: {leftover[0]} (an interrupted copy; not a version, safe to delete)" in listed.stdout
    retry = registry.register("tickets", tmp_path / "b", by="ci")
    assert retry.version == ("2" if kill_point == "copy" else "3")
    assert checksums(Path(retry.url) / "model") == checksums(tmp_path / "b" / "model")


def test_the_registry_command_lists_promotes_and_rolls_back(tmp_path):
    uri = str(tmp_path / "registry")
    registry = Registry(uri)
    for tag in ("a", "b"):
        register(registry, tmp_path / tag, tag, APPROVED)
    me = local_login()  # who moves production is the login running the command, not a name typed on it
    promoted = run_ftpipe("registry", "promote", "tickets", "--to", "1", "--registry", uri)
    assert promoted.returncode == 0 and promoted.stdout.strip() == f"tickets: production - -> 1 by {me}"
    assert run_ftpipe("registry", "promote", "tickets", "--to", "2", "--registry", uri).returncode == 0
    rolled = run_ftpipe("registry", "rollback", "tickets", "--reason", "latency", "--registry", uri)
    assert rolled.stdout.strip() == f"tickets: production 2 -> 1 by {me}"
    listed = run_ftpipe("registry", "list", "tickets", "--registry", uri).stdout.splitlines()
    assert listed[2].split() == ["1", "production", listed[2].split()[2], "approved", "by", "alice", "0.9000"]
    assert listed[3].split()[:2] == ["2", "candidate"]
    assert listed[-1].endswith(f"production: 2 -> 1  by {me}  (latency)")
    refused = run_ftpipe("registry", "rollback", "tickets", "--to", "7", "--registry", uri)
    assert refused.returncode == 2 and refused.stderr.strip() == "error: tickets version 7 was never in production; roll back only to a version that was (use `ftpipe registry promote` for an approved new one)"
    missing = run_ftpipe("registry", "list", "other", "--registry", uri)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: other has no versions in {uri} (models there: tickets)"
