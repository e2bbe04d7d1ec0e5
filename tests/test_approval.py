"""The reviewers' promotion decision against a real Prefect server the test starts on 127.0.0.1, as an adversary
tries it: a name that is not in the policy, a listed name with someone else's token or none, a guessed token sent
straight to the REST API, the run's own submitter, the same reviewer twice; then credentialed approval (promoted),
rejection (not promoted) and a timeout (not promoted). Every answer lands in the model's audit log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from governance.runs import local_login
from serving.registry import Registry
from tests.conftest import ROOT, SHORT_RUN_ARGS, api, api_response, prefect_server_process

APPROVAL = ["--set", "approval.required=true"]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on loopback with its own database, stopped after the module."""
    with prefect_server_process(tmp_path_factory.mktemp("prefect-home")) as (url, env):
        yield url, env


def set_policy(env: dict, out: Path, *args: str) -> dict[str, str]:
    """`ftpipe registry policy quickstart ...` on the run's registry, as an administrator would; returns the tokens."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "policy", "quickstart", "--registry", str(out / "registry"),
                             *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {line.split()[2]: line.rsplit(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("token for ")}


def start_run(env: dict, out: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", "quickstart", *APPROVAL, *SHORT_RUN_ARGS, *overrides, "--output-dir", str(out)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def paused_run(url: str, out: Path, run: subprocess.Popen, after_key: str | None = None, timeout: float = 400) -> tuple[str, str]:
    """(id, pause key) of the finetune run once it waits for a decision (a pause other than `after_key`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-3000:]
        found = api("POST", f"{url}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        for flow_run in found:
            key = flow_run["state"]["state_details"]["pause_key"]
            if flow_run["parameters"].get("output_dir") == str(out) and key != after_key:
                return flow_run["id"], key
        time.sleep(1)
    raise AssertionError("the run never paused for approval")


def approve(env: dict, run_id: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "FTPIPE_REVIEWER_TOKEN"} | ({"FTPIPE_REVIEWER_TOKEN": token} if token else {})
    return subprocess.run([sys.executable, "-m", "flows.cli", "approve", run_id, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=200)


def events(out: Path) -> list:
    return Registry(out / "registry").events("quickstart")


def state_name(url: str, run_id: str) -> str:
    return api("GET", f"{url}/flow_runs/{run_id}")["state"]["name"]


@pytest.mark.slow
def test_forged_answers_are_refused_and_recorded_then_a_credentialed_reviewer_promotes(prefect_api, tmp_path):
    url, env = prefect_api
    tokens = set_policy(env, tmp_path, "--require-approval", "--reviewer", "alice", "--reviewer", "bob", "--login", f"bob={local_login()}")
    run = start_run(env, tmp_path)
    run_id, key = paused_run(url, tmp_path, run)
    artifact = next(tmp_path.glob("*/artifact"))
    before = {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*") if p.is_file()}

    for args, token, why in (
        (["--reviewer", "mallory"], tokens["alice"], "'mallory' is not a reviewer of this model's promotion policy"),
        (["--reviewer", "alice"], tokens["bob"], "the credential given for 'alice' is missing or wrong"),
        (["--reviewer", "bob"], tokens["bob"], f"'bob' started this run and cannot approve it (submitter: {local_login()})"),
    ):
        refused = approve(env, run_id, *args, token=token)
        assert refused.returncode == 2 and f"error: the run refused the decision: {why}" in refused.stderr, refused.stderr
        run_id, key = paused_run(url, tmp_path, run, after_key=key)  # it pauses again, waiting
    no_token = approve(env, run_id, "--reviewer", "alice")
    assert no_token.returncode == 2 and "no reviewer token" in no_token.stderr
    # straight to the REST API as the UI form would send it: no token at all (the form's schema refuses it) ...
    response = api_response("POST", f"{url}/flow_runs/{run_id}/resume", json={"run_input": {"decision": "approve", "reviewer": "alice"}})
    assert response.is_success and response.json()["status"] == "REJECT" and "token" in response.text, response.text
    assert state_name(url, run_id) == "Paused"
    # ... and a typed name with a guessed token (the run refuses it)
    response = api_response("POST", f"{url}/flow_runs/{run_id}/resume",
                            json={"run_input": {"decision": "approve", "reviewer": "alice", "token": "ftpipe_guess"}})
    assert response.is_success and response.json()["status"] == "ACCEPT", response.text
    run_id, key = paused_run(url, tmp_path, run, after_key=key)
    assert state_name(url, run_id) == "Paused"

    approved = approve(env, run_id, "--reviewer", "alice", "--comment", "metrics and safety look right", token=tokens["alice"])
    assert approved.returncode == 0, approved.stderr
    assert "approve by alice accepted (approved)" in approved.stdout
    assert run.wait(timeout=120) == 0, run.communicate()[1][-3000:]
    assert state_name(url, run_id) == "Completed"

    registry = Registry(tmp_path / "registry")
    assert registry.aliases("quickstart") == {"candidate": "1", "production": "1"}
    alice = registry.policy("quickstart").reviewer("alice")
    assert registry.history("quickstart")[-1]["by"] == f"alice ({alice.credential_id})"
    log = events(tmp_path)
    refusals = [e.data["reason"] for e in log if e.event == "decision_refused"]
    assert len(refusals) == 4 and "missing or wrong" in refusals[3]
    decision = next(e for e in log if e.event == "decision")
    assert (decision.data["reviewer"], decision.data["credential_id"], decision.data["comment"]) == (
        "alice", alice.credential_id, "metrics and safety look right")
    assert [e.event for e in log][-3:] == ["decision", "approval", "alias"] and log[-2].data["outcome"] == "approved"
    raw = (tmp_path / "registry" / "quickstart" / "audit.jsonl").read_text()
    assert not any(token in raw for token in tokens.values())
    stored = api("POST", f"{url}/flow_runs/{run_id}/input/filter", json={"prefix": "paused-", "limit": 100})
    assert stored and not any("token" in json.loads(i["value"]) for i in stored if i["key"].endswith("-response"))  # deleted once read
    assert registry.verify("quickstart") == []
    assert {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*") if p.is_file()} == before  # nothing rewritten
    card = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "card", "quickstart", "1", "--registry", str(tmp_path / "registry")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout
    assert f"approve by alice (credential {alice.credential_id}): metrics and safety look right" in card


@pytest.mark.slow
def test_two_approvals_need_two_different_reviewers(prefect_api, tmp_path):
    url, env = prefect_api
    tokens = set_policy(env, tmp_path, "--require-approval", "--reviewer", "alice", "--reviewer", "bob", "--approvals", "2")
    run = start_run(env, tmp_path)
    run_id, key = paused_run(url, tmp_path, run)
    first = approve(env, run_id, "--reviewer", "alice", token=tokens["alice"])
    assert first.returncode == 0 and "accepted (approval 1 of 2 recorded; waiting for more)" in first.stdout, first.stderr
    run_id, key = paused_run(url, tmp_path, run, after_key=key)
    again = approve(env, run_id, "--reviewer", "alice", token=tokens["alice"])
    assert again.returncode == 2 and "'alice' already approved this run; another reviewer must" in again.stderr
    run_id, key = paused_run(url, tmp_path, run, after_key=key)
    assert Registry(tmp_path / "registry").aliases("quickstart") == {"candidate": "1"}
    second = approve(env, run_id, "--reviewer", "bob", token=tokens["bob"])
    assert second.returncode == 0, second.stderr
    assert run.wait(timeout=120) == 0
    outcome = Registry(tmp_path / "registry").approval_outcome("quickstart", "1")
    assert [a["reviewer"] for a in outcome["approvers"]] == ["alice", "bob"]
    assert Registry(tmp_path / "registry").aliases("quickstart")["production"] == "1"


@pytest.mark.slow
def test_a_rejection_ends_the_run_unpromoted_with_the_reason(prefect_api, tmp_path):
    url, env = prefect_api
    tokens = set_policy(env, tmp_path, "--require-approval", "--reviewer", "alice")
    run = start_run(env, tmp_path)
    run_id, _ = paused_run(url, tmp_path, run)
    rejected = approve(env, run_id, "--reviewer", "alice", "--reject", "--comment", "refusals dropped", token=tokens["alice"])
    assert rejected.returncode == 0, rejected.stderr
    assert run.wait(timeout=120) == 1
    assert "not promoted: rejected by alice: refusals dropped" in run.communicate()[1]
    assert state_name(url, run_id) == "Failed"
    registry = Registry(tmp_path / "registry")
    assert registry.aliases("quickstart") == {"candidate": "1"}  # registered for review, never in production
    assert registry.approval_outcome("quickstart", "1")["outcome"] == "rejected"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "promote", "quickstart", "--to", "1", "--registry",
                             str(tmp_path / "registry")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "quickstart version 1 was rejected; only approved versions can be promoted" in result.stderr


@pytest.mark.slow
def test_no_decision_in_time_means_not_promoted(prefect_api, tmp_path):
    url, env = prefect_api
    set_policy(env, tmp_path, "--require-approval", "--reviewer", "alice")
    run = start_run(env, tmp_path, "--set", "approval.timeout_hours=0.002")  # 7.2 s
    _, stderr = run.communicate(timeout=400)
    assert run.returncode == 1, stderr[-3000:]
    assert "not promoted: no decision within 0.002 h" in stderr
    assert "waiting for 1 approval(s) from alice within 0.002 h: ftpipe approve " in stderr  # what to run, printed while it waits
    assert Registry(tmp_path / "registry").approval_outcome("quickstart", "1")["outcome"] == "timed out"
    assert Registry(tmp_path / "registry").aliases("quickstart") == {"candidate": "1"}


def test_approving_a_run_that_does_not_wait_is_refused(prefect_api):
    url, env = prefect_api
    result = approve(env, "0b7c6a52-52c5-4c1e-9d0e-6b1c1f1e2a3b", "--reviewer", "alice", token="ftpipe_x")
    assert result.returncode == 2 and "not found" in result.stderr
    assert os.environ.get("FTPIPE_REVIEWER_TOKEN") is None
