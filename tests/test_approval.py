"""The reviewer's promotion decision against a real Prefect server the test starts on 127.0.0.1: approve (promoted),
reject (not promoted), an unlisted reviewer (refused, the run stays paused), and a timeout (not promoted)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.registry import Registry
from tests.conftest import ROOT, SHORT_RUN_ARGS, api, api_response, prefect_server_process

APPROVAL = ["--set", "approval.required=true", "--set", "approval.reviewers=[alice]"]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """`prefect server start` on loopback with its own database, stopped after the module."""
    with prefect_server_process(tmp_path_factory.mktemp("prefect-home")) as (url, env):
        yield url, env


def start_run(env: dict, out: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", "quickstart", *APPROVAL, *SHORT_RUN_ARGS, *overrides, "--output-dir", str(out)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def paused_run_id(url: str, out: Path, run: subprocess.Popen, timeout: float = 400) -> str:
    """The id of the finetune run once it waits for a decision (it writes into `out`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-3000:]
        found = api("POST", f"{url}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        for flow_run in found:
            if flow_run["parameters"].get("output_dir") == str(out):
                return flow_run["id"]
        time.sleep(1)
    raise AssertionError("the run never paused for approval")


def approve(env: dict, run_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "approve", run_id, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def manifest_of(out: Path) -> dict:
    return json.loads(next(out.glob("*/artifact/manifest.json")).read_text())


def state_name(url: str, run_id: str) -> str:
    return api("GET", f"{url}/flow_runs/{run_id}")["state"]["name"]


@pytest.mark.slow
def test_an_unlisted_reviewer_is_refused_then_a_listed_one_approves_and_the_model_is_promoted(prefect_api, tmp_path):
    url, env = prefect_api
    run = start_run(env, tmp_path)
    run_id = paused_run_id(url, tmp_path, run)
    assert not manifest_of(tmp_path).get("approval")  # built, checked, waiting

    refused = approve(env, run_id, "--reviewer", "mallory")
    assert refused.returncode == 2 and "'mallory' is not a reviewer of this run; its recipe lists: alice" in refused.stderr
    # the same answer through the REST API (as the UI form would send it): the run refuses it and pauses again
    time.sleep(2)
    response = api_response("POST", f"{url}/flow_runs/{run_id}/resume", json={"run_input": {"decision": "approve", "reviewer": "mallory"}})
    assert response.is_success and response.json()["status"] == "ACCEPT", response.text
    deadline = time.monotonic() + 60
    while not (state_name(url, run_id) == "Paused" and api("GET", f"{url}/flow_runs/{run_id}")["state"]["state_details"]["pause_key"] != "1"):
        assert time.monotonic() < deadline and run.poll() is None, "the run did not pause again after the refusal"
        time.sleep(0.5)

    approved = approve(env, run_id, "--reviewer", "alice", "--comment", "metrics and safety look right")
    assert approved.returncode == 0, approved.stderr
    assert run.wait(timeout=120) == 0, run.communicate()[1][-3000:]
    manifest = manifest_of(tmp_path)
    record = manifest["approval"]
    assert (record["decision"], record["reviewer"], record["promoted"]) == ("approved", "alice", True)
    assert record["comment"] == "metrics and safety look right" and record["decided_at"].endswith("Z")
    assert [r["reviewer"] for r in record["refused"]] == ["mallory"]
    card = (next(tmp_path.glob("*/artifact")) / "README.md").read_text()
    assert "approved by alice" in card
    from data_prep.files import sha256_file

    assert manifest["files"]["README.md"] == sha256_file(next(tmp_path.glob("*/artifact")) / "README.md")
    assert state_name(url, run_id) == "Completed"
    registry = Registry(tmp_path / "registry")
    assert registry.aliases("quickstart") == {"candidate": "1", "production": "1"}
    assert registry.history("quickstart")[-1]["by"] == "alice"
    assert registry.manifest(registry.version("quickstart", "1"))["approval"]["reviewer"] == "alice"


@pytest.mark.slow
def test_a_rejection_ends_the_run_unpromoted_with_the_reason(prefect_api, tmp_path):
    url, env = prefect_api
    run = start_run(env, tmp_path)
    run_id = paused_run_id(url, tmp_path, run)
    rejected = approve(env, run_id, "--reviewer", "alice", "--reject", "--comment", "refusals dropped")
    assert rejected.returncode == 0, rejected.stderr
    assert run.wait(timeout=120) == 1
    assert "not promoted: rejected by alice: refusals dropped" in run.communicate()[1]
    record = manifest_of(tmp_path)["approval"]
    assert (record["decision"], record["promoted"]) == ("rejected", False)
    assert state_name(url, run_id) == "Failed"
    registry = Registry(tmp_path / "registry")
    assert registry.aliases("quickstart") == {"candidate": "1"}  # registered for review, never in production
    assert registry.manifest(registry.version("quickstart", "1"))["approval"]["decision"] == "rejected"


@pytest.mark.slow
def test_no_decision_in_time_means_not_promoted(prefect_api, tmp_path):
    url, env = prefect_api
    run = start_run(env, tmp_path, "--set", "approval.timeout_hours=0.002")  # 7.2 s
    _, stderr = run.communicate(timeout=400)
    assert run.returncode == 1, stderr[-3000:]
    assert "not promoted: no decision within 0.002 h" in stderr
    record = manifest_of(tmp_path)["approval"]
    assert (record["decision"], record["promoted"]) == ("timed out", False)
    assert Registry(tmp_path / "registry").aliases("quickstart") == {"candidate": "1"}


def test_approving_a_run_that_does_not_wait_is_refused(prefect_api):
    url, env = prefect_api
    result = approve(env, "0b7c6a52-52c5-4c1e-9d0e-6b1c1f1e2a3b", "--reviewer", "alice")
    assert result.returncode == 2 and "not found" in result.stderr
