"""monitor: score production's outputs with the scorers that gated its release; alert, record, roll back.

The monitoring section comes from the production version's registered manifest, and rollback from the model's policy
in the audit log: the person who starts (or schedules) a monitoring run chooses only where to look (the endpoint URL and
the traffic files, both recorded), never what counts as a breach or whether production moves back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from evaluation.endpoints import EndpointClient
from evaluation.monitor import MonitoringError, Scorer, ask_canary, monitor_outputs, read_traffic, recorded_values
from flows.caching import RETRIES
from flows.failures import fails_cleanly
from flows.finetune import _flow_run_label
from flows.reports import monitoring_markdown, monitoring_table
from recipes import Recipe
from recipes.schema import EndpointSection
from serving.export import CANARY_FILE
from serving.registry import PRODUCTION, Registry, RegistryError, Version, registry_for

BREACH_EVENT = "ftpipe.monitoring.breach"
ROLLBACK_EVENT = "ftpipe.monitoring.rollback"


@flow(name="monitor", persist_result=True, validate_parameters=False)
@fails_cleanly
def monitor(model: str, output_dir: str = "runs", registry: str | None = None, endpoint_url: str | None = None,
            endpoint_model: str | None = None, traffic: str | None = None) -> dict:
    """Check the production version of a registered model: its canary suite through the serving endpoint and sampled
    traffic, against the values recorded at evaluation and the recipe's thresholds.

    Args:
        model: the registered model's name (its recipe's name)
        output_dir: the folder that holds run folders and the registry (and the monitoring reports)
        registry: the registry's folder or fsspec URL (default: <output_dir>/registry)
        endpoint_url: the serving endpoint's API root (default: the version's monitoring.endpoint.base_url)
        endpoint_model: the model name the endpoint serves (default: monitoring.endpoint.model, else the recipe's name,
            which the artifact's vLLM launch files serve it as)
        traffic: request/response JSONL: a path, glob or fsspec URL (default: the version's monitoring.traffic)
    """
    store = registry_for(registry, output_dir)
    version, manifest, recipe = production_version(store, model)
    folder = store.local_copy(version, Path(output_dir) / ".registry-cache")
    recipe = with_policy_thresholds(recipe, store.policy(model).monitor_thresholds)
    result = check_outputs(recipe, manifest, folder, endpoint_of(recipe, endpoint_url, endpoint_model), traffic)
    result |= {"model": model, "version": version.version, "flow_run": _flow_run_label()}
    entry = record(store, model, version, result)
    report = write_report(Path(output_dir), model, entry.seq, result)
    history = [e for e in store.events(model) if e.event == "monitoring"]
    key = artifact_key(model)
    create_markdown_artifact(key=key, markdown=monitoring_markdown(result, history, report),
                             description=f"{model} version {version.version}: {result['status']}")
    create_table_artifact(key=f"{key}-metrics", table=monitoring_table(result),
                          description=f"{model} version {version.version}: every monitored metric, its interval and drift")
    return {k: result[k] for k in ("model", "version", "status", "breaches", "rollback")} | {"audit_entry": entry.seq, "report": str(report)}


def artifact_key(model: str) -> str:
    """monitoring-<model> in the characters Prefect allows in an artifact key (lowercase letters, digits, dashes)."""
    return "monitoring-" + re.sub(r"[^a-z0-9-]", "-", model)


def production_version(store: Registry, model: str) -> tuple[Version, dict, Recipe]:
    """The production version, its manifest and the recipe it was released with (monitoring section included)."""
    version = store.resolve(model, PRODUCTION)
    if version is None:
        raise MonitoringError(f"{model} has no production version in {store.uri}; monitoring watches production")
    if problems := store.version_problems(version):  # a loosened manifest is not the recipe the version was released with
        raise MonitoringError(f"{problems[0]}; `ftpipe registry verify {model}` lists every problem")
    manifest = store.manifest(version)
    return version, manifest, Recipe.model_validate(manifest["recipe"])


def with_policy_thresholds(recipe: Recipe, mandatory: list) -> Recipe:
    """The version's monitoring thresholds and then each mandatory one of the model's policy it does not list."""
    thresholds = recipe.monitoring.thresholds
    if extra := [t for t in mandatory if t not in thresholds]:
        recipe = recipe.model_copy(deep=True)
        recipe.monitoring.thresholds = [*thresholds, *extra]
    return recipe


@task(name="score-outputs", **RETRIES)
def check_outputs(recipe: Recipe, manifest: dict, folder: Path, endpoint: EndpointSection | None, traffic: str | None) -> dict:
    """Ask the canary suite, read the traffic, score both and compare with the release."""
    section = recipe.monitoring
    suite = read_canary(folder)
    location = traffic or section.traffic
    if endpoint is None and location is None:
        raise MonitoringError("monitoring: nothing to monitor; give the endpoint (monitoring.endpoint, or the endpoint_url "
                              "parameter / --endpoint) and/or the traffic files (monitoring.traffic, or traffic / --traffic)")
    scorer = Scorer.of(recipe)
    canary = []
    if endpoint is not None and suite:
        with EndpointClient(endpoint, recipe.evaluation.generation.max_new_tokens) as client:
            canary = ask_canary(client, suite)
    read = read_traffic(location, section) if location else None
    result = monitor_outputs(section, scorer, canary, read, recorded_values(manifest, suite, scorer))
    return result | {"endpoint": endpoint.base_url if endpoint else None, "traffic": location,
                     "canary_suite": len(suite) if endpoint else 0}


def read_canary(folder: Path) -> list[dict]:
    path = folder / CANARY_FILE
    if not path.is_file():
        return []  # registered before ftpipe shipped a canary suite: traffic alone
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def endpoint_of(recipe: Recipe, endpoint_url: str | None, endpoint_model: str | None) -> EndpointSection | None:
    """The version's monitoring endpoint, its base_url and model replaced by the run's when given."""
    section = recipe.monitoring.endpoint
    if section is None and endpoint_url is None:
        return None
    section = (section or EndpointSection(name="production", base_url=endpoint_url, model=recipe.name)).model_copy(deep=True)
    if endpoint_url:
        section.base_url = endpoint_url  # checked on assignment, as in a recipe
    if endpoint_model:
        section.model = endpoint_model
    return section


def record(store: Registry, model: str, version: Version, result: dict):
    """The run in the audit log; on a breach, the Prefect event and, where the policy allows, the rollback."""
    rollback = rollback_plan(store, model, result)
    result["rollback"] = rollback
    entry = store.append(model, "monitoring", result["flow_run"], summary(result))
    if result["status"] != "breach":
        return entry
    emit(BREACH_EVENT, model, version.version, {"breaches": result["breaches"], "audit_entry": entry.seq, "rollback": rollback})
    if rollback.get("to"):
        moved = store.rollback(model, result["flow_run"], to=rollback["to"],
                               reason=f"monitoring breach (audit entry {entry.seq}): {result['breaches'][0]}")
        emit(ROLLBACK_EVENT, model, moved["version"], {"from": version.version, "audit_entry": entry.seq})
    return entry


def rollback_plan(store: Registry, model: str, result: dict) -> dict:
    """Whether this run moves production back, and to which version, or why not."""
    if result["status"] != "breach":
        return {}
    if not store.policy(model).rollback_on_breach:
        return {"refused": "the model's policy does not roll back on a breach (`ftpipe registry policy --rollback-on-breach`)"}
    try:
        return {"to": store.previous_production(model, skip_rollbacks=True)}
    except RegistryError as exc:
        return {"refused": str(exc)}


def summary(result: dict) -> dict:
    """What the audit entry keeps: the verdict, every metric's value and interval, drift, thresholds and where it looked."""
    metrics = {name: {k: m[k] for k in ("value", "low", "high") if k in m} for name, m in result["metrics"].items()}
    return {"version": result["version"], "status": result["status"], "breaches": result["breaches"], "metrics": metrics,
            "drift": result["drift"], "thresholds": result["thresholds"], "counts": result["counts"],
            "endpoint": result["endpoint"], "traffic": result["traffic"], "traffic_files": result["traffic_files"],
            "rollback": result["rollback"]}


def emit(event: str, model: str, version: str, payload: dict) -> None:
    """A Prefect event about the model (related to this flow run), for automations that notify or page."""
    from prefect.events import emit_event

    emit_event(event=event, resource={"prefect.resource.id": f"ftpipe.model.{model}", "prefect.resource.name": model,
                                      "ftpipe.version": str(version)}, payload=payload)


def write_report(output_dir: Path, model: str, seq: int, result: dict) -> Path:
    """The full result (every flagged example and unreadable line) beside the runs; the audit entry keeps the summary."""
    path = output_dir / "monitoring" / model / f"{seq:06d}-v{result['version']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
