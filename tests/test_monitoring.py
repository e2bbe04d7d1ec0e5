"""After release: monitoring production's outputs (planted PII leaks, refusals, format breaks, cut-offs, unreadable
lines, each detected; clean periods passing), rollback only where the policy allows, the release watcher's decisions,
and the scheduled deployments against a real Prefect server and `transformers serve`."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from evaluation.monitor import Output, Scorer, monitor_outputs, read_traffic, recorded_values
from evaluation.releases import base_fingerprint, last_seen, review_verdict
from recipes import load_recipe, resolve_recipe
from recipes.schema import MonitoringSection, MonitorThreshold
from tests.conftest import ROOT, api, api_response, background, create_run, deployment_id, prefect_server_process, stop, wait_for

QUICKSTART = load_recipe(ROOT / "recipes" / "quickstart.yaml")
ROUTE = '{"team": "billing", "priority": "high"}'


def record(answer: str | None, user: str = "I was charged twice.", finish: str = "stop", **extra) -> dict:
    """One traffic line as the README documents it."""
    line = {"time": "2026-12-03T10:00:00Z", "request": {"model": "ticket", "messages": [{"role": "user", "content": user}]},
            "latency_ms": 120.0, **extra}
    if answer is None:
        return line | {"status": 503}
    return line | {"response": {"choices": [{"message": {"role": "assistant", "content": answer}, "finish_reason": finish}]}}


def write_traffic(path: Path, records: list[dict], extra_lines: list[str] = ()) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in extra_lines))
    return str(path)


PERIODS = {  # each planted problem in 8 of 40 records of its period
    "clean": ([record(ROUTE)] * 40, None),
    "pii": ([record(ROUTE)] * 32 + [record(f"{ROUTE} call our agent on +44 20 7946 0958")] * 8, "traffic.pii_leak_rate"),
    "refusals": ([record(ROUTE)] * 32 + [record("I'm sorry, I can't help with that.")] * 8, "traffic.refusal_rate"),
    "format": ([record(ROUTE)] * 32 + [record("billing, high")] * 8, "traffic.json_valid"),
    "cutoff": ([record(ROUTE)] * 32 + [record('{"team": "bil', finish="length")] * 8, "traffic.cutoff_rate"),
    "errors": ([record(ROUTE)] * 32 + [record(None)] * 8, "traffic.error_rate"),
}


def check(location: str, section: MonitoringSection | None = None, recipe=QUICKSTART) -> dict:
    section = section or recipe.monitoring
    scorer = Scorer.of(recipe)
    recorded = {"traffic.json_valid": 1.0, "traffic.json_schema": 1.0, "traffic.refusal_rate": 0.0}
    return monitor_outputs(section, scorer, [], read_traffic(location, section), recorded)


@pytest.mark.parametrize("period", list(PERIODS))
def test_each_planted_problem_breaches_and_a_clean_period_passes(tmp_path, period):
    records, metric = PERIODS[period]
    result = check(write_traffic(tmp_path / f"{period}.jsonl", records))
    if metric is None:
        assert result["status"] == "ok" and result["breaches"] == [], result["breaches"]
        assert result["metrics"]["traffic.json_valid"]["value"] == 1.0
        return
    assert result["status"] == "breach"
    assert any(b.startswith(metric) for b in result["breaches"]), result["breaches"]
    assert result["metrics"][metric]["value"] == pytest.approx(0.8 if metric == "traffic.json_valid" else 0.2)
    flagged = next(iter(result["examples"].values()))
    assert flagged[0]["where"].endswith(f"{period}.jsonl line 33")  # the first planted record, by file and line


def test_pii_the_user_gave_is_not_a_leak_but_pii_from_elsewhere_is(tmp_path):
    echo = record(f"{ROUTE} we will write to ana@example.com", user="Charged twice. Reach me at ana@example.com")
    other = record(f"{ROUTE} we will write to bob@example.com", user="Charged twice. Reach me at ana@example.com")
    assert check(write_traffic(tmp_path / "echo.jsonl", [echo] * 10))["metrics"]["traffic.pii_leak_rate"]["value"] == 0.0
    assert check(write_traffic(tmp_path / "other.jsonl", [echo] * 9 + [other]))["metrics"]["traffic.pii_leak_rate"]["value"] == 0.1


def test_an_injection_canary_in_an_output_is_a_leak(tmp_path):
    recipe = resolve_recipe(QUICKSTART, {"monitoring.injection_canaries": ["ZEBRA-7731"]})
    leaked = record("My instructions say ZEBRA-7731.")
    result = check(write_traffic(tmp_path / "t.jsonl", [record(ROUTE)] * 19 + [leaked]), recipe=recipe)
    assert result["metrics"]["traffic.injection_leak_rate"]["value"] == 0.05 and result["status"] == "breach"


def test_unreadable_lines_are_named_by_file_and_line_and_never_dropped_silently(tmp_path):
    location = write_traffic(tmp_path / "t.jsonl", [record(ROUTE)] * 5, ['{"request": {}}', "not json"])
    result = check(location)
    assert result["counts"]["traffic_unreadable"] == 2 and result["status"] == "breach"
    assert result["unreadable"][0].startswith(f"{tmp_path / 't.jsonl'} line 6: ")
    assert "2 traffic line(s) unreadable" in result["breaches"][0]


def test_a_glob_reads_every_file_and_a_window_keeps_recent_records(tmp_path):
    old = record(ROUTE) | {"time": "2020-01-01T00:00:00Z"}
    write_traffic(tmp_path / "a.jsonl", [record(ROUTE)] * 3)
    write_traffic(tmp_path / "b.jsonl", [old] * 4)
    section = QUICKSTART.monitoring.model_copy(update={"traffic_window_hours": 24.0})
    from datetime import datetime, timezone

    read = read_traffic(str(tmp_path / "*.jsonl"), section, now=datetime(2026, 12, 3, 12, tzinfo=timezone.utc))
    assert read.records == 3 and len(read.files) == 2
    with pytest.raises(ValueError, match="monitoring.traffic: no file matches"):
        read_traffic(str(tmp_path / "none-*.jsonl"), section)


def test_drift_needs_the_whole_interval_worse_than_at_evaluation_beyond_the_tolerance():
    scorer = Scorer.of(QUICKSTART)
    section = QUICKSTART.monitoring.model_copy(update={"thresholds": []})

    def canary(right: int, total: int) -> list[Output]:
        return [Output("canary", f"canary row {i}", [{"role": "user", "content": "q"}], ROUTE if i < right else "wrong",
                       reference=ROUTE) for i in range(total)]

    noisy = monitor_outputs(section, scorer, canary(38, 40), None, {"canary.exact_match": 1.0})
    assert not noisy["drift"]["canary.exact_match"]["drifted"] and noisy["status"] == "ok"  # 2 of 40: within noise
    dropped = monitor_outputs(section, scorer, canary(28, 40), None, {"canary.exact_match": 1.0})
    assert dropped["drift"]["canary.exact_match"]["drifted"] and dropped["status"] == "breach"
    assert dropped["breaches"][0].startswith("canary.exact_match drifted from 1 at evaluation to 0.7")


def test_recorded_values_come_from_the_manifest_and_the_answers_given_at_evaluation():
    suite = [{"kind": "task", "messages": [{"role": "user", "content": "q"}], "reference": ROUTE, "released": ROUTE},
             {"kind": "task", "messages": [{"role": "user", "content": "q"}], "reference": ROUTE, "released": "I cannot help"}]
    recorded = recorded_values({"evaluation": {"candidate": {"exact_match": 0.9, "safety.refusal_rate": 1.0}}}, suite,
                               Scorer.of(QUICKSTART))
    assert recorded["canary.exact_match"] == recorded["traffic.exact_match"] == 0.9
    assert recorded["canary.safety.refusal_rate"] == 1.0 and recorded["traffic.refusal_rate"] == 0.5


def test_bad_monitoring_settings_are_refused_naming_the_field():
    from recipes import RecipeError

    with pytest.raises(ValueError, match="unknown monitoring metric 'traffic.accuracy'"):
        MonitorThreshold(metric="traffic.accuracy", max=1)
    with pytest.raises(ValueError, match="exactly one of min, max"):
        MonitorThreshold(metric="traffic.refusal_rate")
    with pytest.raises(RecipeError, match="monitoring.every"):
        resolve_recipe(QUICKSTART, {"monitoring.every": "hourly"})


def test_the_release_watcher_opens_a_review_only_beyond_noise_and_says_why_not():
    best = {"base": "tiny:qwen2", "objective_vs_champion": {"value": 0.1, "low": 0.05, "high": 0.15}, "usd_per_1k_requests": 0.2}
    assert review_verdict(best, [best], "exact_match", {"cost": {}}) == (
        True, "tiny:qwen2: better than production beyond noise (exact_match vs production +0.1000 [+0.0500, +0.1500])")
    noisy = best | {"objective_vs_champion": {"value": 0.05, "low": -0.025, "high": 0.125}}
    assert review_verdict(noisy, [noisy], "exact_match", {})[1].startswith("tiny:qwen2: not better than production beyond noise")
    assert review_verdict(best, [best], "exact_match", None)[1].startswith("no production version")
    lower = best | {"objective_vs_champion": {"value": -0.5, "low": -0.6, "high": -0.4}}
    assert review_verdict(lower, [lower], "eval_loss", {})[0]  # lower loss is better


def test_a_base_is_fingerprinted_by_its_files_and_a_check_remembers_what_it_saw(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    first = base_fingerprint(str(folder))
    assert base_fingerprint(str(folder)) == first and base_fingerprint("org/model@" + "a" * 40) == "commit:" + "a" * 40
    (folder / "config.json").write_text('{"model_type": "llama", "rope_theta": 1e6}')
    assert base_fingerprint(str(folder)) != first

    class Entry:
        def __init__(self, event, data):
            self.event, self.data = event, data

    assert last_seen([Entry("release_check", {"checked": {"a": "1"}}), Entry("alias", {}),
                      Entry("release_check", {"checked": {"a": "2", "b": "3"}})]) == {"a": "2", "b": "3"}


# ---- against real servers ---------------------------------------------------------------------------------------
def _version_folder(artifact, prepared_small, folder: Path, recipe, tag: str) -> Path:
    """The exported ticket artifact as released with `recipe`: its canary suite and the recipe in its manifest."""
    from data_prep.files import checksums
    from data_prep.prepare import read_jsonl
    from evaluation.monitor import canary_suite

    from serving.cards import model_card

    shutil.copytree(artifact.path, folder)
    suite = canary_suite(recipe, read_jsonl(prepared_small.eval_path), None)
    (folder / "canary.jsonl").write_text("".join(json.dumps(row) + "\n" for row in suite))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest |= {"recipe": recipe.model_dump(mode="json"), "recipe_hash": tag * 64, "name": recipe.name}
    (folder / "README.md").write_text(model_card(manifest))
    files = checksums(folder)
    files.pop("manifest.json")
    (folder / "manifest.json").write_text(json.dumps(manifest | {"files": files}))
    return folder


def flow_runs(url: str, deployment: str) -> list[dict]:
    return api("POST", f"{url}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC"})


def wait_for_runs(url: str, deployment: str, count: int, log: Path, timeout: float = 300) -> list[dict]:
    """The deployment's first `count` finished flow runs, made by the server's scheduler (none is created here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in flow_runs(url, deployment) if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
        if len(done) >= count:
            return done
        time.sleep(2)
    raise AssertionError(f"{count} scheduled runs of {deployment} did not finish in {timeout:g} s:\n{log.read_text()[-3000:]}")


def test_ftpipe_serve_monitors_production_on_a_schedule_rolls_back_on_a_pii_leak_and_its_release_watcher_opens_a_review(
        tmp_path, artifact, prepared_small, served_artifact):
    """One Prefect server and `ftpipe serve --monitor ticket --watch quickstart`: the scheduler's monitoring runs pass on
    clean traffic, alert and roll back on a leaking period; the watcher tunes a new base, finds it better than
    production beyond noise, opens a review that a reviewer approves, and skips the unchanged base next time."""
    from governance.policy import Policy
    from governance.record import render_card
    from serving.registry import Registry
    from tests.conftest import SHORT_RUN_ARGS, run_ftpipe

    url, model = served_artifact
    # the trained_lora fixture learned the task well, not perfectly: tolerate its canary exact match below the recorded 1.0
    recipe = resolve_recipe(QUICKSTART, {"name": "ticket", "monitoring.canary_rows": 8, "monitoring.canary_probes": False,
                                         "monitoring.drift_tolerance": 0.5,
                                         "monitoring.endpoint": {"name": "production", "base_url": "http://127.0.0.1:9/v1", "model": model}})
    out = tmp_path / "runs"
    registry = Registry(out / "registry")
    for tag in ("1", "2"):
        version = registry.register("ticket", _version_folder(artifact, prepared_small, tmp_path / f"v{tag}", recipe, tag), by="test")
        registry.set_alias("ticket", "production", version.version, by="test", reason="released")
    registry.set_policy("ticket", Policy(rollback_on_breach=True), by="admin")
    traffic = write_traffic(tmp_path / "traffic" / "period-1.jsonl", PERIODS["clean"][0])
    # quickstart's production: 3 training steps, so a properly tuned new base is better beyond noise
    weak = run_ftpipe("run", "quickstart", *SHORT_RUN_ARGS, "--output-dir", str(out))
    assert weak.returncode == 0, weak.stderr[-3000:]
    policy = run_ftpipe("registry", "policy", "quickstart", "--require-approval", "--reviewer", "alice", "--registry", str(out / "registry"))
    token = next(line.rsplit(": ", 1)[1] for line in policy.stdout.splitlines() if line.startswith("token for alice"))

    with prefect_server_process(tmp_path / "prefect", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2") as (api_url, env):
        log = tmp_path / "serve.log"
        serve = background([sys.executable, "-m", "flows.cli", "serve", "--output-dir", str(out), "--monitor", "ticket",
                            "--monitor-every", "15s", "--endpoint", url, "--traffic", str(tmp_path / "traffic" / "*.jsonl"),
                            "--watch", "quickstart", "--watch-every", "1d", "--watch-base", "tiny:qwen2"], env, log)
        try:
            monitor = deployment_id(api_url, "monitor/monitor-ticket", serve, log)
            watch = deployment_id(api_url, "watch-releases/watch-quickstart", serve, log)
            first = wait_for_runs(api_url, monitor, 1, log)[0]
            assert first["state"]["type"] == "COMPLETED", log.read_text()[-3000:]
            ok = [e for e in registry.events("ticket") if e.event == "monitoring"]
            assert ok[0].data["status"] == "ok" and ok[0].data["version"] == "2", ok[0].data["breaches"]
            assert ok[0].data["counts"]["canary"] == 8 and ok[0].data["counts"]["traffic_scored"] == 40
            assert ok[0].data["endpoint"] == url

            Path(traffic).unlink()  # the next period leaks a phone number in 8 of 40 answers
            write_traffic(tmp_path / "traffic" / "period-2.jsonl", PERIODS["pii"][0])
            deadline = time.monotonic() + 300
            while not [e for e in registry.events("ticket") if e.event == "monitoring" and e.data["version"] == "1"]:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
            assert api_response("PATCH", f"{api_url}/deployments/{monitor}", json={"paused": True}).status_code == 204
            breach_events = api("POST", f"{api_url}/events/filter",
                                json={"filter": {"event": {"name": ["ftpipe.monitoring.breach"]}}, "limit": 10})["events"]
            artifacts = api("POST", f"{api_url}/artifacts/filter", json={"artifacts": {"key": {"any_": ["monitoring-ticket"]}}})

            # the watcher's deployment carries its schedule; a run through the REST API finds tiny:qwen2 new and better
            schedule = api("GET", f"{api_url}/deployments/{watch}/schedules")[0]["schedule"]
            assert schedule["interval"] == 86400
            overrides = {"evaluation.max_samples": 24, "evaluation.safety.max_new_tokens": 4}
            checked = create_run(api_url, watch, {"overrides": overrides})
            review = wait_for_paused_run(api_url, log)
            approved = run_ftpipe("approve", review, "--reviewer", "alice", **env, FTPIPE_REVIEWER_TOKEN=token)
            assert approved.returncode == 0, approved.stderr[-3000:]
            assert wait_for(api_url, checked, timeout=600)["state"]["type"] == "COMPLETED", log.read_text()[-3000:]
            again = wait_for(api_url, create_run(api_url, watch, {"overrides": overrides}), timeout=300)
            assert again["state"]["type"] == "COMPLETED"
        finally:
            stop(serve)

    events = registry.events("ticket")
    breach = next(e for e in events if e.event == "monitoring" and e.data["status"] == "breach")
    assert breach.data["version"] == "2" and breach.data["rollback"] == {"to": "1"}
    assert breach.data["breaches"][0].startswith("traffic.pii_leak_rate <= 0: measured 0.2")
    rollback = events[events.index(breach) + 1]
    assert rollback.event == "alias" and (rollback.data["previous"], rollback.data["version"]) == ("2", "1")
    assert rollback.data["reason"].startswith(f"monitoring breach (audit entry {breach.seq}): traffic.pii_leak_rate")
    alert = next(e for e in breach_events if e["resource"]["ftpipe.version"] == "2")
    assert alert["resource"]["prefect.resource.id"] == "ftpipe.model.ticket" and alert["payload"]["rollback"] == {"to": "1"}
    # a later run checks version 1, which leaks too: it alerts, and does not roll "back" to 2 (a rollback is no promotion)
    later = [e for e in registry.events("ticket") if e.event == "monitoring" and e.data["version"] == "1"]
    assert later and later[0].data["rollback"]["refused"].startswith("ticket: production (1) has no earlier production version")
    assert artifacts and {a["description"].rsplit(": ", 1)[1] for a in artifacts} >= {"ok", "breach"}
    card = render_card(registry, "ticket", "2")
    assert "- every 1h (`ftpipe serve --monitor MODEL`), against http://127.0.0.1:9/v1" in card  # the registered plan
    assert "1 with a breach; 1 rollback(s)" in card and "production 2 -> 1" in card
    assert registry.verify("ticket") == []

    quickstart = [e for e in registry.events("quickstart") if e.event == "release_check"]
    assert len(quickstart) == 1  # the second run saw no change and tuned nothing
    check = quickstart[0].data
    assert check["checked"] == {"tiny:qwen2": "tiny:qwen2"} and check["review"] and check["production"] == "1"
    assert check["why"].startswith("tiny:qwen2: better than production beyond noise (exact_match vs production +")
    assert set(check["cost"]) >= {"candidate_usd_per_1k_requests", "production_usd_per_1k_requests", "candidate_training_usd"}
    assert registry.aliases("quickstart")["production"] == "2"  # the review was approved and promoted
    assert registry.version_problems(registry.version("quickstart", "2")) == []
    assert registry.manifest(registry.version("quickstart", "2"))["base_model"]["model_id"] == "tiny:qwen2"


def wait_for_paused_run(url: str, log: Path, timeout: float = 900) -> str:
    """The id of the first flow run paused for approval (the review the watcher opened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paused = api("POST", f"{url}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})
        if paused:
            return paused[0]["id"]
        time.sleep(2)
    raise AssertionError(f"no run paused for approval within {timeout:g} s:\n{log.read_text()[-3000:]}")


def test_whoever_runs_monitoring_cannot_loosen_it_and_rollback_is_the_policys(tmp_path, artifact, prepared_small):
    """The monitor takes no threshold or rollback parameter; the version's thresholds come from its registered
    manifest (an edited one stops monitoring, named) plus the policy's mandatory ones (a version registered with none
    still breaches them); a breach rolls back only once `ftpipe registry policy --rollback-on-breach` says so; every
    run and move is in `ftpipe registry log`."""
    from flows.monitor import monitor
    from serving.registry import Registry
    from tests.conftest import run_ftpipe

    assert set(monitor.parameters.properties) == {"model", "output_dir", "registry", "endpoint_url", "endpoint_model", "traffic"}
    recipe = resolve_recipe(QUICKSTART, {"name": "ticket", "monitoring.canary_rows": 0, "monitoring.canary_probes": False,
                                         "monitoring.thresholds": []})  # the run that registered it dropped every threshold
    out = tmp_path / "runs"
    uri = str(out / "registry")
    registry = Registry(uri)
    for tag in ("1", "2"):
        registry.register("ticket", _version_folder(artifact, prepared_small, tmp_path / f"v{tag}", recipe, tag), by="test")
        registry.set_alias("ticket", "production", tag, by="test")
    leaking = write_traffic(tmp_path / "t.jsonl", [record(ROUTE)] * 10 + [record(f"{ROUTE} +44 20 7946 0958")] * 2 + [record(ROUTE)] * 28)
    policy = run_ftpipe("registry", "policy", "ticket", "--monitor-threshold", "traffic.pii_leak_rate<=0", "--registry", uri)
    assert policy.returncode == 0 and "mandatory monitoring thresholds: traffic.pii_leak_rate <= 0" in policy.stdout, policy.stderr
    bad = run_ftpipe("registry", "policy", "ticket", "--monitor-threshold", "traffic.accuracy<=1", "--registry", uri)
    assert bad.returncode == 2 and "unknown monitoring metric 'traffic.accuracy'" in bad.stderr

    alerted = run_ftpipe("monitor", "ticket", "--traffic", leaking, "--output-dir", str(out))
    assert alerted.returncode == 1, alerted.stderr[-3000:]
    assert "BREACH traffic.pii_leak_rate <= 0: measured 0.05" in alerted.stdout
    assert "production stays: the model's policy does not roll back on a breach" in alerted.stdout
    assert registry.aliases("ticket")["production"] == "2"
    assert run_ftpipe("registry", "policy", "ticket", "--rollback-on-breach", "--registry", uri).returncode == 0
    assert monitor("ticket", output_dir=str(out), traffic=leaking)["rollback"] == {"to": "1"}
    assert registry.aliases("ticket")["production"] == "1"
    log = run_ftpipe("registry", "log", "ticket", "--registry", uri).stdout
    assert "monitoring         flow run" in log and "version 2 breach; traffic.pii_leak_rate <= 0: measured 0.05; rollback to 1" in log
    assert "production 2 -> 1 (monitoring breach (audit entry" in log

    manifest = out / "registry" / "ticket" / "1" / "manifest.json"
    loosened = json.loads(manifest.read_text())
    loosened["recipe"]["monitoring"]["drift_tolerance"] = 1.0
    manifest.write_text(json.dumps(loosened))
    state = monitor("ticket", output_dir=str(out), traffic=leaking, return_state=True)
    assert state.is_failed() and "manifest.json changed since registration" in str(state.result(raise_on_failure=False))




def test_an_endpoint_that_does_not_answer_the_canary_is_a_breach_not_a_crash():
    from evaluation.endpoints import EndpointClient
    from evaluation.monitor import ask_canary
    from recipes.schema import EndpointSection
    from tests.conftest import free_port

    down = EndpointSection(name="production", base_url=f"http://127.0.0.1:{free_port()}/v1", model="ticket", max_retries=0)
    suite = [{"kind": "task", "messages": [{"role": "user", "content": "q"}], "reference": ROUTE}]
    with EndpointClient(down) as client:
        canary = ask_canary(client, suite)
    assert canary[0].answer is None and "ConnectError" in canary[0].error
    result = monitor_outputs(QUICKSTART.monitoring, Scorer.of(QUICKSTART), canary, None, {})
    assert result["status"] == "breach" and result["breaches"] == ["canary.error_rate <= 0: measured 1"]


def test_the_report_key_is_one_prefect_accepts_for_any_model_name():
    from prefect.client.schemas.actions import ArtifactCreate

    from flows.monitor import artifact_key

    for name in ("ticket", "ticket_router.v2", "a-b"):
        assert ArtifactCreate(key=artifact_key(name), type="markdown", data="x").key.startswith("monitoring-")
