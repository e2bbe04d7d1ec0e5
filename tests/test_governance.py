"""Governance as an adversary tries it: the audit log's chain, edited files and logs, the policy a run cannot weaken,
credentials instead of typed names, registry names and broken files, and `ftpipe registry policy|verify|card`."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from governance import audit
from governance.audit import AuditError
from governance.policy import Policy, authenticate, parse_gate, with_changes
from governance.runs import govern, local_login
from recipes import RecipeError, load_recipe
from serving.registry import PRODUCTION, Registry, RegistryError
from tests.conftest import ROOT, run_ftpipe
from tests.test_registry import APPROVED, register

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def governed_registry(tmp_path: Path, **changes) -> tuple[Registry, dict[str, str]]:
    """A registry whose `quickstart` model has a policy requiring alice's or bob's approval; returns the tokens."""
    registry = Registry(tmp_path / "registry")
    policy, tokens = with_changes(Policy(), require_approval=True, reviewers=["alice", "bob"], **changes)
    registry.set_policy("quickstart", policy, by="admin")
    return registry, tokens


# ---- the hash chain --------------------------------------------------------------------------------------------

def test_every_kind_of_edit_to_the_log_breaks_the_chain_at_that_entry(tmp_path):
    registry = Registry(tmp_path / "registry")
    for tag in "abc":
        register(registry, tmp_path / tag, tag, APPROVED)
    log_file = tmp_path / "registry" / "tickets" / "audit.jsonl"
    original = log_file.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    assert len(lines) == 9 and registry.verify("tickets") == []

    edits = {
        "a changed field": original.replace(b'"outcome": "approved"', b'"outcome": "rejected"', 1),
        "a removed entry": "".join(lines[:3] + lines[4:]).encode(),
        "swapped entries": "".join(lines[:3] + [lines[4], lines[3]] + lines[5:]).encode(),
        "a truncated last line": original[:-40],
        "an appended entry without its hash": original + json.dumps({**json.loads(lines[-1]), "seq": 10}).encode() + b"\n",
    }
    expected = {"a changed field": r"entry 3 \(approval at .*\): edited after it was written",
                "a removed entry": r"entry 4 \(.*\): numbered 5, expected 4",
                "swapped entries": r"entry 4 \(.*\): numbered 5, expected 4",
                "a truncated last line": r"line 9: not an audit entry \(truncated or edited\)",
                "an appended entry without its hash": r"entry 10 \(.*\): does not follow entry 9"}
    for what, payload in edits.items():
        log_file.write_bytes(payload)
        problems = registry.verify("tickets")
        assert len(problems) == 1 and __import__("re").search(expected[what], problems[0]), (what, problems)
        with pytest.raises(AuditError, match="nothing is decided on a broken audit log"):
            registry.promote("tickets", "1", by="mallory")
        result = run_ftpipe("registry", "verify", "tickets", "--registry", str(tmp_path / "registry"))
        assert result.returncode == 1 and result.stdout.startswith("FAIL ") and str(log_file) in result.stdout, what
    log_file.write_bytes(original)
    assert registry.verify("tickets") == []


def test_no_single_byte_of_the_log_or_a_version_record_changes_unnoticed(tmp_path):
    """Every byte of audit.jsonl, registered.json and manifest.json flipped in turn (whitespace and newlines too:
    a vertical tab for a newline once slipped through a line splitter), and the log cut short: each is found."""
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a", APPROVED)
    folder = tmp_path / "registry" / "tickets"
    for path in (folder / "audit.jsonl", folder / "1" / "registered.json", folder / "1" / "manifest.json"):
        original = path.read_bytes()
        unnoticed = []
        for bit in (0x01, 0x20):
            for i in range(len(original)):
                changed = bytearray(original)
                changed[i] ^= bit
                path.write_bytes(bytes(changed))
                if not registry.verify("tickets"):
                    unnoticed.append((i, bit))
        for cut in (1, 2, len(original) // 2):
            path.write_bytes(original[:-cut])
            if not registry.verify("tickets"):
                unnoticed.append(("cut", cut))
        path.write_bytes(original)
        assert unnoticed == [], (path.name, unnoticed[:5])
    assert registry.verify("tickets") == []


def test_a_rewritten_log_is_caught_by_the_head_an_auditor_noted(tmp_path):
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a", APPROVED)
    noted = registry.events("tickets")[-1].hash
    ok = run_ftpipe("registry", "verify", "tickets", "--head", noted, "--registry", str(tmp_path / "registry"))
    assert ok.returncode == 0 and ok.stdout.strip().endswith(f"head {noted})")
    # whoever can write the folder rebuilds a self-consistent chain that says something else
    entries = registry.events("tickets")
    rebuilt: list[audit.Entry] = []
    for entry in entries:
        data = {**entry.data, "outcome": "approved"} if entry.event == "approval" else {**entry.data, "reason": "forged"}
        rebuilt.append(audit.new_entry(rebuilt[-1] if rebuilt else None, entry.event, entry.by, data))
    (tmp_path / "registry" / "tickets" / "audit.jsonl").write_bytes(audit.serialise(rebuilt))
    assert registry.verify("tickets") == []  # a chain alone cannot know it was replaced whole ...
    caught = run_ftpipe("registry", "verify", "tickets", "--head", noted, "--registry", str(tmp_path / "registry"))
    assert caught.returncode == 1 and f"no longer holds entry {noted}" in caught.stdout  # ... the noted head can


def _append_many(uri: str, worker: int) -> None:
    registry = Registry(uri)
    for i in range(15):
        registry.append("tickets", "gates", f"worker {worker}", {"run": f"{worker}-{i}", "passed": True})


def test_concurrent_appends_keep_one_unbroken_chain(tmp_path):
    uri = str(tmp_path / "registry")
    processes = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(uri, w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    events = Registry(uri).events("tickets")
    assert len(events) == 45 and sorted(e.data["run"] for e in events) == sorted(f"{w}-{i}" for w in range(3) for i in range(15))


# ---- files that anyone could edit -----------------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["model/model-00000.safetensors", "README.md", "manifest.json", "registered.json"])
def test_an_edited_byte_anywhere_in_a_version_is_found_and_never_promoted(tmp_path, victim):
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a", APPROVED)
    path = tmp_path / "registry" / "tickets" / "1" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = registry.verify("tickets")
    assert len(problems) == 1 and problems[0].startswith("tickets version 1: ") and (victim.split("/")[-1] in problems[0]
                                                                                    or "manifest.json" in problems[0])
    with pytest.raises(RegistryError, match="a version whose files changed is never moved to production"):
        registry.promote("tickets", "1", by="alice")
    assert registry.aliases("tickets").get(PRODUCTION) is None


def test_a_manifest_edited_to_say_approved_does_not_promote(tmp_path):
    """The issue's bypass: `approval.promoted=true` written into a registered manifest, then `registry promote`."""
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a")  # registered, never approved
    manifest_file = tmp_path / "registry" / "tickets" / "1" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["approval"] = {"required": True, "decision": "approved", "reviewer": "alice", "promoted": True}
    manifest_file.write_text(json.dumps(manifest))
    result = run_ftpipe("registry", "promote", "tickets", "--to", "1", "--registry", str(tmp_path / "registry"))
    assert result.returncode == 2 and "manifest.json changed since registration" in result.stderr
    manifest_file.write_text(json.dumps({k: v for k, v in manifest.items() if k != "approval"}))  # put back as registered
    assert registry.verify("tickets") == []
    with pytest.raises(RegistryError, match="tickets version 1 has no approval decision yet"):  # the log decides, not a file
        registry.promote("tickets", "1", by="mallory")
    assert registry.aliases("tickets") == {"candidate": "1"}


def test_an_edited_aliases_view_is_ignored_and_reported(tmp_path):
    registry = Registry(tmp_path / "registry")
    register(registry, tmp_path / "a", "a", APPROVED)
    registry.promote("tickets", "1", by="alice")
    register(registry, tmp_path / "b", "b")  # never approved
    view = tmp_path / "registry" / "tickets" / "aliases.json"
    view.write_text(json.dumps({"aliases": {"candidate": "2", "production": "2"}}))
    assert registry.resolve("tickets", PRODUCTION).version == "1"  # what champion resolution and serving read
    assert registry.verify("tickets") == [f"{view}: does not match the alias moves in the audit log (edited); the log is what counts"]
    view.write_text('{"aliases": {"produc')  # truncated
    assert registry.resolve("tickets", PRODUCTION).version == "1" and len(registry.verify("tickets")) == 1


def test_a_registered_version_keeps_every_decision_and_its_files(tmp_path):
    """A later decision on the same version is a new entry; the earlier approval, a refusal and the files stay."""
    registry = Registry(tmp_path / "registry")
    version = register(registry, tmp_path / "a", "a", APPROVED)
    registry.promote("tickets", version, by="alice (cred-1)")
    before = {p.name: p.read_bytes() for p in (tmp_path / "registry" / "tickets" / "1").iterdir() if p.is_file()}
    registry.append("tickets", "decision_refused", "mallory", {"version": "1", "claimed_reviewer": "alice", "decision": "reject",
                                                               "reason": "the credential given for 'alice' is missing or wrong"})
    registry.append("tickets", "approval", "flow run 2", {"version": "1", "outcome": "rejected", "approvers": [], "run": "flow run 2"})
    assert {p.name: p.read_bytes() for p in (tmp_path / "registry" / "tickets" / "1").iterdir() if p.is_file()} == before
    outcomes = [e.data["outcome"] for e in registry.events("tickets") if e.event == "approval"]
    assert outcomes == ["approved", "rejected"] and registry.aliases("tickets")[PRODUCTION] == "1"
    card = run_ftpipe("registry", "card", "tickets", "1", "--registry", str(tmp_path / "registry"))
    assert card.returncode == 0
    assert "outcome **approved**" in card.stdout and "outcome **rejected**" in card.stdout
    assert "refused an answer claiming to be 'alice'" in card.stdout and "Now: candidate, production." in card.stdout


def test_registry_names_and_broken_files_get_errors_that_say_what_to_do(tmp_path):
    uri = str(tmp_path / "registry")
    for name in ("../..", "../etc", "Tickets", "a/b"):
        result = run_ftpipe("registry", "list", name, "--registry", uri)
        assert result.returncode == 2 and result.stderr.startswith(f"error: model name {name!r}: use lowercase letters"), result.stderr
    registry = Registry(uri)
    register(registry, tmp_path / "a", "a", APPROVED)
    (tmp_path / "registry" / "tickets" / "audit.jsonl").write_bytes(b'{"seq": 1, "at"')
    listed = run_ftpipe("registry", "list", "tickets", "--registry", uri)
    assert listed.returncode == 2 and "audit.jsonl line 1: not an audit entry (truncated or edited)" in listed.stderr
    assert "Traceback" not in listed.stderr and "`ftpipe registry verify` lists every problem" in listed.stderr


def test_a_corrupt_artifact_is_never_registered_and_a_corrupt_version_never_handed_out(tmp_path):
    registry = Registry(tmp_path / "registry")
    artifact = tmp_path / "a"
    register(registry, artifact, "a", APPROVED)
    shard = artifact / "model" / "model-00001.safetensors"
    shard.write_bytes(bytes(len(shard.read_bytes())))  # zeroed in the run folder
    with pytest.raises(RegistryError, match=r"is not registered: model/model-00001.safetensors: SHA-256 differs"):
        registry.register("tickets", artifact, by="rerun")
    (tmp_path / "registry" / "tickets" / "1" / "model" / "model-00000.safetensors").write_bytes(b"zeroed")
    with pytest.raises(RegistryError, match=r"tickets version 1: model/model-00000.safetensors: SHA-256 differs"):
        registry.register("tickets", make_intact_copy(tmp_path), by="rerun")


def make_intact_copy(tmp_path: Path) -> Path:
    from tests.test_registry import make_artifact

    return make_artifact(tmp_path / "a2", "a")


# ---- the policy ------------------------------------------------------------------------------------------------

def test_a_run_cannot_weaken_its_models_policy(tmp_path):
    registry, _ = governed_registry(tmp_path, gates=[parse_gate("exact_match>=0.9"),
                                                     parse_gate("{metric: exact_match, no_regression_vs: champion, tolerance: 0.02}")])
    development = load_recipe(QUICKSTART)  # approval.required: false
    with pytest.raises(RecipeError) as refused:
        govern(development, registry)
    assert refused.value.lines[0].startswith(f"approval.required: false would skip the approval the promotion policy of model "
                                             f"'quickstart' in {registry.uri} requires (1 approval(s) from alice, bob;")
    weakened = load_recipe(QUICKSTART, ["approval.required=true", "approval.reviewers=[mallory]",
                                        "evaluation.gates=[{metric: exact_match, min: 0.5}]", "registry.compare_with_champion=false"])
    with pytest.raises(RecipeError) as refused:
        govern(weakened, registry)
    assert [line.split(":")[0] for line in refused.value.lines] == [
        "approval.reviewers", "evaluation.gates[0]", "registry.compare_with_champion"]
    assert "exact_match min 0.5 is looser than the mandatory gate exact_match min 0.9" in refused.value.lines[1]
    looser_tolerance = load_recipe(QUICKSTART, ["approval.required=true",
                                                "evaluation.gates=[{metric: exact_match, no_regression_vs: champion, tolerance: 0.5}]"])
    with pytest.raises(RecipeError, match=r"evaluation.gates\[0\]: exact_match no_regression_vs champion \(tolerance 0.5\) is looser"):
        govern(looser_tolerance, registry)
    # a run may narrow the reviewers, add gates and keep the mandatory ones, which it then applies
    stricter = load_recipe(QUICKSTART, ["approval.required=true", "approval.reviewers=[bob]", "evaluation.gates=[{metric: exact_match, min: 0.95}]"])
    governance = govern(stricter, registry)
    assert governance.reviewers == ["bob"] and governance.approval_required and governance.approvals == 1
    assert [(g.metric, g.kind) for g in governance.gates] == [("exact_match", "min"), ("exact_match", "min"), ("exact_match", "no_regression_vs")]


def test_the_command_line_refuses_the_override_before_any_work(tmp_path):
    governed_registry(tmp_path)
    result = run_ftpipe("run", "quickstart", "--set", "approval.required=false", "--output-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("approval.required: false would skip the approval")
    assert not list(tmp_path.glob("quickstart-*"))  # nothing prepared, trained or registered


def test_approval_without_credentialed_reviewers_is_refused_at_start(tmp_path):
    with pytest.raises(RecipeError, match=r"approval.required: no reviewer of model 'quickstart' .* has a credential .*"
                                          r"`ftpipe registry policy quickstart --require-approval --reviewer NAME"):
        govern(load_recipe(QUICKSTART, ["approval.required=true", "approval.reviewers=[alice]"]), Registry(tmp_path / "registry"))
    with pytest.raises(ValueError, match="approval.required: approval decides promotion in the registry"):
        load_recipe(QUICKSTART, ["approval.required=true", "registry.enabled=false"])


def test_credentials_not_names_identify_reviewers(tmp_path):
    registry, tokens = governed_registry(tmp_path, logins={"bob": "bob.smith"})
    policy = registry.policy("quickstart")
    assert authenticate(policy, "alice", tokens["alice"], [], None)[0].name == "alice"
    for reviewer, token, submitter, why in (
        ("alice", "", None, "the credential given for 'alice' is missing or wrong"),
        ("alice", tokens["bob"], None, "the credential given for 'alice' is missing or wrong"),  # bob's token, alice's name
        ("alice", tokens["alice"] + "x", None, "missing or wrong"),
        ("mallory", tokens["alice"], None, "'mallory' is not a reviewer"),
        ("bob", tokens["bob"], "bob.smith", "'bob' started this run and cannot approve it"),
        ("alice", tokens["alice"], "alice", "'alice' started this run"),
    ):
        found, reason = authenticate(policy, reviewer, token, [], submitter)
        assert found is None and why in reason and (not token or token not in reason)
    assert authenticate(policy, "alice", tokens["alice"], ["bob"], None)[0] is None  # the run narrowed its reviewers to bob
    log = (tmp_path / "registry" / "quickstart" / "audit.jsonl").read_text()
    assert not any(token in log for token in tokens.values())  # only hashes are kept


def test_the_policy_command_sets_shows_rotates_and_logs(tmp_path):
    uri = str(tmp_path / "registry")
    shown = run_ftpipe("registry", "policy", "quickstart", "--registry", uri)
    assert shown.stdout.strip() == f"quickstart in {uri}: no approval required; mandatory gates: none"
    too_few = run_ftpipe("registry", "policy", "quickstart", "--require-approval", "--reviewer", "alice", "--approvals", "2", "--registry", uri)
    assert too_few.returncode == 2 and "2 approval(s) required but 1 reviewer(s) named" in too_few.stderr
    bad_gate = run_ftpipe("registry", "policy", "quickstart", "--gate", "exact_match>>1", "--registry", uri)
    assert bad_gate.returncode == 2 and "--gate 'exact_match>>1': write METRIC>=VALUE" in bad_gate.stderr
    unknown = run_ftpipe("registry", "policy", "quickstart", "--gate", "speed>=1", "--registry", uri)
    assert unknown.returncode == 2 and "unknown metric 'speed'" in unknown.stderr
    for args, error in ((["--reviewer", "../x"], "--reviewer '../x': a name of letters"), (["--approvals", "0"], "--approvals: Input should be"),
                        (["--login", "alice"], "--login 'alice': write NAME=LOGIN"), (["--new-token", "carol"], "--new-token carol: not a reviewer")):
        result = run_ftpipe("registry", "policy", "quickstart", *args, "--registry", uri)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {error}"), result.stderr
    made = run_ftpipe("registry", "policy", "quickstart", "--require-approval", "--reviewer", "alice", "--reviewer", "bob",
                      "--approvals", "2", "--gate", "exact_match>=0.9", "--reason", "go-live", "--registry", uri)
    assert made.returncode == 0, made.stderr
    tokens = {line.split()[2]: line.rsplit(": ", 1)[1] for line in made.stdout.splitlines() if line.startswith("token for ")}
    assert set(tokens) == {"alice", "bob"} and all(t.startswith("ftpipe_") for t in tokens.values())
    rotated = run_ftpipe("registry", "policy", "quickstart", "--new-token", "bob", "--registry", uri)
    assert [line.split(" ")[2] for line in rotated.stdout.splitlines() if line.startswith("token for")] == ["bob"]
    policy = Registry(uri).policy("quickstart")
    assert (policy.require_approval, policy.approvals, [g.metric for g in policy.gates]) == (True, 2, ["exact_match"])
    entries = [e for e in Registry(uri).events("quickstart") if e.event == "policy"]
    assert len(entries) == 2 and entries[0].data["reason"] == "go-live" and entries[0].by == local_login()


def test_a_listing_cut_short_by_its_reader_ends_quietly(tmp_path):
    import subprocess
    import sys

    registry = Registry(tmp_path / "registry")
    for tag in "abcdefgh":
        register(registry, tmp_path / tag, tag, APPROVED)
    for i in range(500):  # a history longer than a pipe's buffer, so the writer is still writing when head leaves
        registry.append("tickets", "alias", "ci", {"alias": "candidate", "version": "1", "previous": "8", "reason": f"move {i} " + "x" * 80})
    command = f"{sys.executable} -m flows.cli registry list tickets --registry {tmp_path / 'registry'} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("tickets in ") and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_check_artifact_on_a_registry_version_finds_a_manifest_edited_after_registration(artifact, tmp_path):
    """The issue's case: an approval written into a registered manifest left `check-artifact` passing."""
    from serving.checks import check_artifact

    registry = Registry(tmp_path / "registry")
    version = registry.register("quickstart", artifact.path, by="ci")
    folder = Path(version.url)
    assert check_artifact(folder) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "approval": {"decision": "approved", "promoted": True}}))
    assert check_artifact(folder) == [f"quickstart version 1: manifest.json changed since registration (SHA-256 differs from "
                                      f"audit entry {registry.events('quickstart')[0].seq})"]
    assert check_artifact(Path(artifact.path)) == []  # the run folder's artifact is not a registry version
