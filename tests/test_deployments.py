"""The deployments against a real Prefect server the tests start on 127.0.0.1: `ftpipe serve`, a run triggered with
curl (the README's call) and one with `run_deployment`, the "gpu" limit keeping their training apart, a re-run with
a changed gate reusing every stage before the gate, a bad recipe refused with the recipe's own error lines,
prefect.yaml deployed to a process work pool and run by a worker, and an authenticated server."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import (ROOT, SHORT_RUN, api, api_response, background, create_run, deployment_id, prefect_server_process,
                            stop, wait_for)

pytestmark = pytest.mark.slow


def readme_curl_flags() -> list[str]:
    """The flags of the README's create_flow_run curl call (between `curl` and `-X POST`)."""
    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("curl ") and "create_flow_run" in l)
    return line.split(" -X ")[0].split()[1:]


def task_runs(url: str, run_id: str) -> dict[str, dict]:
    """The flow run's task runs by task name (prepare-data, train, ...)."""
    runs = api("POST", f"{url}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    return {run["name"].rsplit("-", 1)[0]: run for run in runs}


def readme_rest_body() -> dict:
    """The JSON body of the README's create_flow_run call (its `-d '...'` line)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("curl ") and "create_flow_run" in l)
    return json.loads(re.search(r"-d '(\{.*\})'", lines[start + 1]).group(1))


def run_result(url: str, run_id: str) -> dict:
    """The README's way for REST users: the run's `run-result` JSON artifact."""
    found = api("POST", f"{url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["run-result"]}}})
    assert len(found) == 1 and found[0]["type"] == "json", found
    return found[0]["data"]


def artifact_path(url: str, run_id: str) -> Path:
    return Path(run_result(url, run_id)["artifact_path"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Prefect server and `ftpipe serve` (the finetune and prepare deployments, one training at a time)."""
    out = tmp_path_factory.mktemp("served-runs")
    with prefect_server_process(tmp_path_factory.mktemp("prefect-served")) as (url, env):
        log = out / "serve.log"
        serve = background([sys.executable, "-m", "flows.cli", "serve", "--output-dir", str(out), "--gpus", "1"], env, log)
        try:
            yield url, env, deployment_id(url, "finetune/finetune", serve, log), out
        finally:
            stop(serve)


def test_curl_and_run_deployment_train_one_at_a_time_and_a_rerun_reuses_every_stage_before_the_gate(served, tmp_path):
    url, env, deployment, out = served
    first_parameters = {"recipe": "quickstart", "overrides": SHORT_RUN | {"training.seed": 1}}
    body = json.dumps({"parameters": first_parameters, "idempotency_key": f"test-{tmp_path.name}"})
    curl = ["curl", *readme_curl_flags(), "-X", "POST", f"{url}/deployments/{deployment}/create_flow_run",  # the README's call
            "-H", "Content-Type: application/json", "-d", body]
    first, again = (json.loads(subprocess.run(curl, capture_output=True, text=True, check=True).stdout) for _ in range(2))
    assert again["id"] == first["id"], "a repeated POST with the same idempotency key made a second run"
    first = first["id"]

    script = tmp_path / "trigger.py"  # the README's Python equivalent
    script.write_text(f"""from prefect.deployments import run_deployment

flow_run = run_deployment("finetune/finetune", parameters={{"recipe": "quickstart", "overrides": {SHORT_RUN | {"training.seed": 2}!r}}}, timeout=1800)
print(flow_run.state.name, flow_run.state.result())
""")
    second = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    state, path = second.stdout.split()[-2:]
    assert state == "Completed" and (Path(path) / "manifest.json").is_file() and Path(path).is_relative_to(out)

    assert wait_for(url, first)["state"]["type"] == "COMPLETED"
    assert (artifact_path(url, first) / "model" / "config.json").is_file()
    slots = sorted((datetime.fromisoformat(held["held_from"]), datetime.fromisoformat(held["held_until"])) for held in (
        json.loads((artifact / "manifest.json").read_text())["training"]["gpu_slot"] for artifact in (artifact_path(url, first), Path(path))))
    assert slots[0][1] <= slots[1][0], f"the gpu limit let two trainings overlap: {slots}"

    rerun_parameters = {"recipe": "quickstart", "overrides": first_parameters["overrides"] | {
        "evaluation.gates": [{"metric": "exact_match", "min": 0.0}]}}
    rerun = create_run(url, deployment, rerun_parameters)
    assert wait_for(url, rerun)["state"]["type"] == "COMPLETED"
    states = {name: run["state"]["name"] for name, run in task_runs(url, rerun).items()}
    assert {states[s] for s in ("prepare-data", "resolve-model", "filter-tokens", "train", "evaluate")} == {"Cached"}, states
    assert states["gate"] == states["export"] == "Completed", states


def test_the_readmes_curl_retries_a_503_with_its_idempotency_key_and_prints_one_answer():
    """A stand-in server answers the first POST as Prefect's SQLite server does when writes collide (503), then 201."""
    import http.server
    import threading

    bodies = []

    class FlakyOnce(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, answer = (503, {"exception_message": "Service Unavailable"}) if len(bodies) == 1 else (201, {"id": "run-1"})
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"parameters": {"recipe": "quickstart"}, "idempotency_key": "ticket-4711"})
        url = f"http://127.0.0.1:{server.server_port}/api/deployments/d/create_flow_run"
        curl = subprocess.run(["curl", *readme_curl_flags(), "-X", "POST", url, "-H", "Content-Type: application/json", "-d", body],
                              capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert curl.returncode == 0 and json.loads(curl.stdout) == {"id": "run-1"}, curl.stdout + curl.stderr
    assert [b["idempotency_key"] for b in bodies] == ["ticket-4711", "ticket-4711"]


def test_compare_models_deployment_trains_its_bases_one_at_a_time_on_one_gpu_and_publishes_a_leaderboard(served, tmp_path):
    url, env, _, out = served
    script = tmp_path / "compare.py"
    script.write_text(f"""import json
from prefect.deployments import run_deployment

parameters = {{"recipe": "quickstart", "bases": ["tiny:llama", "tiny:qwen2"], "overrides": {SHORT_RUN | {"compare.parallel": 2}!r}}}
flow_run = run_deployment("compare-models/compare-models", parameters=parameters, timeout=1800)
print(json.dumps({{"id": str(flow_run.id), "state": flow_run.state.name, "result": flow_run.state.result()}}))
""")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["state"] == "Completed"
    ranked = run["result"]["leaderboard"]
    assert [r["rank"] for r in ranked] == [1, 2] and {r["base"] for r in ranked} == {"tiny:llama", "tiny:qwen2"}
    assert all(Path(r["run_dir"]).is_relative_to(out) for r in ranked) and len({r["run_dir"] for r in ranked}) == 2
    slots = sorted((datetime.fromisoformat(r["gpu_slot"]["held_from"]), datetime.fromisoformat(r["gpu_slot"]["held_until"])) for r in ranked)
    assert slots[0][1] <= slots[1][0], f"two candidates trained at once on one GPU: {slots}"
    found = api("POST", f"{url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["leaderboard"]}}})
    table = json.loads(found[0]["data"])
    costs = api("POST", f"{url}/artifacts/filter", json={"artifacts": {"key": {"any_": ["cost"]}}})
    assert any("CPU-seconds" in c["data"] and "not priced: CPU-core hours (cost.prices.cpu)" in c["data"] for c in costs)
    assert [row["base"] for row in table] == [r["base"] for r in ranked] and {"rank", "exact_match", "delta vs production", "gates",
                                                                              "train s", "cost USD"} <= set(table[0])


def test_the_readmes_rest_example_completes_passing_its_gates_and_its_result_reads_as_json(served, tmp_path):
    """The README's REST call, verbatim (recipe, overrides, idempotency key), finishes Completed with its gates passed,
    and `run-result` gives the artifact's path, its manifest and the registry version as plain JSON."""
    url, _, deployment, out = served
    body = readme_rest_body()
    curl = ["curl", *readme_curl_flags(), "-X", "POST", f"{url}/deployments/{deployment}/create_flow_run", "-H",
            "Content-Type: application/json", "-d", json.dumps(body)]
    run = json.loads(subprocess.run(curl, capture_output=True, text=True, check=True).stdout)["id"]
    assert wait_for(url, run, timeout=1200)["state"]["type"] == "COMPLETED"
    result = run_result(url, run)
    path = Path(result["artifact_path"])
    from flows.publish import json_safe

    assert path.is_relative_to(out) and result["manifest"] == json_safe(json.loads((path / "manifest.json").read_text()))
    assert result["manifest"]["gates"]["passed"] and result["manifest"]["gates"]["results"]
    assert result["registry"]["model"] == body["parameters"]["overrides"]["name"] and result["registry"]["version"] == "1"
    assert result["registry"]["decision"] == "not required"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lora.r": 0}, "Validation failed for field 'overrides'. Failure reason: 'lora.r' is not valid under any of the given schemas"),
    ({"training.lora.rank": 4}, "'training.lora.rank' is not valid under any of the given schemas"),
    ({"training": {"lora": {"r": 0}}}, "0 is less than or equal to the minimum of 0"),
])
def test_bad_parameters_are_refused_when_submitted_and_no_run_is_made(served, overrides, message):
    url, _, deployment, _ = served
    before = len(api("POST", f"{url}/flow_runs/filter", json={}))
    refused = api_response("POST", f"{url}/deployments/{deployment}/create_flow_run", json={"parameters": {"recipe": "quickstart",
                                                                                                         "overrides": overrides}})
    assert refused.status_code == 409 and message in refused.json()["detail"], refused.text
    unknown = api_response("POST", f"{url}/deployments/{deployment}/create_flow_run", json={"parameters": {"recipe": "quickstrat"}})
    assert unknown.status_code == 409 and "'quickstrat' is not one of ['dpo', 'quickstart']" in unknown.json()["detail"]
    assert len(api("POST", f"{url}/flow_runs/filter", json={})) == before


def test_what_the_schema_cannot_see_fails_the_run_before_any_stage_with_the_recipes_lines_and_no_traceback(served):
    """A gate on the quantized export without one passes the schema (each field is valid) but not the recipe's rules:
    Failed before any stage, the recipe's line as the state's message and in the log, and no traceback logged."""
    url, _, deployment, _ = served
    run = create_run(url, deployment, {"recipe": "quickstart", "overrides": {"evaluation.gates": [{"metric": "quantized.exact_match", "min": 0.5}]}})
    flow_run = wait_for(url, run, timeout=300)
    assert flow_run["state"]["type"] == "FAILED" and task_runs(url, run) == {}
    line = ("recipe: evaluation.gates[0].metric quantized.exact_match: measured on the quantized export; set export.quantize "
            "(fp8_dynamic or w4a16)")
    assert flow_run["state"]["message"] == f"invalid input: {line}"
    deadline, logs = time.monotonic() + 60, []
    while not any(log.startswith("Finished in state Failed") for log in logs):  # the run's logs reach the server in batches
        assert time.monotonic() < deadline, logs
        time.sleep(1)
        logs = [log["message"] for log in api("POST", f"{url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run]}}})]
    assert line in logs
    assert not [log for log in logs if "Traceback" in log], logs


def test_a_deployment_run_by_recipe_name_is_approved_with_ftpipe_approve_and_cannot_drop_its_policy(served):
    """The deployment path (recipe by name, overrides) under a registry policy: an override turning approval off is
    refused before any stage; a run that pauses is approved with `ftpipe approve` and the reviewer's token."""
    url, env, deployment, out = served
    policy = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "policy", "governed", "--require-approval", "--reviewer",
                             "alice", "--gate", "exact_match>=0", "--registry", str(out / "registry")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    token = next(line.rsplit(": ", 1)[1] for line in policy.stdout.splitlines() if line.startswith("token for alice"))
    weakened = create_run(url, deployment, {"recipe": "quickstart", "overrides": SHORT_RUN | {"name": "governed"}})
    flow_run = wait_for(url, weakened, timeout=300)
    assert flow_run["state"]["type"] == "FAILED" and task_runs(url, weakened) == {}
    assert "approval.required: false would skip the approval the promotion policy of model 'governed'" in flow_run["state"]["message"]

    run = create_run(url, deployment, {"recipe": "quickstart", "overrides": SHORT_RUN | {"name": "governed", "approval.required": True}})
    deadline = datetime.now().timestamp() + 900
    while api("GET", f"{url}/flow_runs/{run}")["state"]["type"] != "PAUSED":
        assert datetime.now().timestamp() < deadline, api("GET", f"{url}/flow_runs/{run}")["state"]
        subprocess.run(["sleep", "2"])
    approved = subprocess.run([sys.executable, "-m", "flows.cli", "approve", run, "--reviewer", "alice"], cwd=ROOT,
                              env=env | {"FTPIPE_REVIEWER_TOKEN": token}, capture_output=True, text=True, timeout=300)
    assert approved.returncode == 0, approved.stderr[-3000:]
    assert wait_for(url, run, timeout=300)["state"]["type"] == "COMPLETED"
    from serving.registry import Registry

    registry = Registry(out / "registry")
    assert registry.aliases("governed")["production"] == "1"
    gates = next(e for e in registry.events("governed") if e.event == "gates" and e.data["passed"])
    assert [r["description"].split(" ")[0] for r in gates.data["results"]][-1] == "exact_match"  # the policy's gate was applied
    assert gates.data["mandatory"] == [{"metric": "exact_match", "min": 0.0, "tolerance": 0.0}]


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(tmp_path):
    with prefect_server_process(tmp_path / "prefect") as (url, env):
        env = dict(env, PWD=str(ROOT))  # what `{{ $PWD }}` in prefect.yaml resolves to, as in a shell
        prefect = [sys.executable, "-m", "prefect"]
        subprocess.run([*prefect, "work-pool", "create", "ftpipe-local", "--type", "process"], env=env, cwd=ROOT, check=True, capture_output=True)
        deploy = subprocess.run([*prefect, "--no-prompt", "deploy", "--name", "finetune-local", "--name", "prepare-local"],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        finetune = api("GET", f"{url}/deployments/name/finetune/finetune-local")
        assert finetune["entrypoint"] == "flows/finetune.py:finetune" and finetune["enforce_parameter_schema"] is True
        assert set(finetune["parameter_openapi_schema"]["properties"]) == {"recipe", "overrides", "output_dir", "force"}
        prepare = api("GET", f"{url}/deployments/name/prepare/prepare-local")
        run = create_run(url, prepare["id"], {"output_dir": str(tmp_path / "runs")})
        worker = subprocess.run([*prefect, "worker", "start", "--pool", "ftpipe-local", "--run-once"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        flow_run = wait_for(url, run, timeout=120)
        assert flow_run["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
        assert len(list((tmp_path / "runs").glob("quickstart-*/data/train.jsonl"))) == 1


def test_a_server_with_an_auth_string_refuses_clients_without_it(tmp_path):
    with prefect_server_process(tmp_path / "prefect", PREFECT_SERVER_API_AUTH_STRING="admin:s3cret") as (url, env):
        assert api_response("POST", f"{url}/deployments/filter", json={}).status_code == 401
        assert api_response("POST", f"{url}/deployments/filter", json={}, auth=("admin", "s3cret")).status_code == 200
        ls = [sys.executable, "-m", "prefect", "deployment", "ls"]
        refused = subprocess.run(ls, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        allowed = subprocess.run(ls, env=dict(env, PREFECT_API_AUTH_STRING="admin:s3cret"), capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        for command in (["serve", "--output-dir", str(tmp_path / "runs")], ["approve", "0f0f0f0f-0000-4000-8000-000000000000", "--reviewer", "alice"]):
            ftpipe = subprocess.run([sys.executable, "-m", "flows.cli", *command], env=dict(env, FTPIPE_REVIEWER_TOKEN="ftpipe_x"), cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
            assert ftpipe.returncode == 2 and "Traceback" not in ftpipe.stderr, ftpipe.stderr
            assert ftpipe.stderr.strip().splitlines()[-1] == (
                f"error: the Prefect server at {url} refused the request (401 Unauthorized): it was started with an auth string "
                "(PREFECT_SERVER_API_AUTH_STRING); give the same to this command with PREFECT_API_AUTH_STRING=user:password "
                "(or `prefect config set PREFECT_API_AUTH_STRING=...`)"), ftpipe.stderr
