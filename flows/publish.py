"""What a person reads in the Prefect UI for each stage, published by the flow itself (not inside the cached
tasks), so a re-run whose stages end Cached shows the same reports."""
from __future__ import annotations

import math
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from data_prep.prepare import PreparedData
from evaluation.costs import cost_markdown
from evaluation.evaluate import EvalResult
from flows.reports import (EXAMPLES_SHOWN, data_report_markdown, evaluation_table, example_report_markdown, example_table,
                           safety_table, training_summary_markdown)
from recipes import Recipe
from serving.export import ArtifactResult
from serving.registry import Version
from training.train import TrainResult


def publish_data(data: PreparedData) -> None:
    create_markdown_artifact(key="data-report", markdown=data_report_markdown(data), description="Data preparation report")


def publish_training(recipe: Recipe, trained: TrainResult) -> None:
    create_markdown_artifact(key="training-summary", description="Training summary",
                             markdown=training_summary_markdown(recipe.name, trained, recipe.training.adapter, recipe.training.lora.r))


def publish_evaluation(recipe: Recipe, result: EvalResult) -> None:
    create_table_artifact(key="evaluation", table=evaluation_table(result), description=_evaluation_caption(result))
    full = create_markdown_artifact(key="evaluation-examples-full", markdown=example_report_markdown(result.report_path),
                                    description="Every example of the evaluation-examples table, in full")
    create_table_artifact(key="evaluation-examples", table=example_table(result.report_path),
                          description=f"Per-example outputs (first {EXAMPLES_SHOWN} of each suite), with the candidate's win, loss or "
                                      f"tie; texts cut to fit, prompts and full texts by example name in "
                                      f"{link_to_artifact(full, 'evaluation-examples-full')}")
    if recipe.evaluation.safety.enabled:
        create_table_artifact(key="safety", table=safety_table(result.report_path),
                              description="Red-team and counterfactual bias probes: " + ", ".join(
                                  f"{k.removeprefix('safety.')} {result.base[k]:.3f} -> {result.candidate[k]:.3f}"
                                  for k in result.candidate if k.startswith("safety.")))


def _evaluation_caption(result: EvalResult) -> str:
    info = result.champion_info
    champion = ("no other model in production" if info is None else f"champion: production version {info['version']}"
                if info["evaluated"] else info["reason"])
    caption = ("Base vs candidate per metric (" + champion + "); rows per suite: " + ", ".join(f"{k} {v}" for k, v in result.examples.items())
               + "; candidate wins/losses/ties vs base per suite: " + ", ".join(f"{k} {o['win']}/{o['loss']}/{o['tie']}" for k, o in result.outcomes.items()))
    if result.outcomes_vs_champion:
        caption += "; vs champion: " + ", ".join(f"{k} {o['win']}/{o['loss']}/{o['tie']}" for k, o in result.outcomes_vs_champion.items())
    return caption + f". Every example's outputs: `{result.report_path}`"


def publish_artifact(recipe: Recipe, artifact: ArtifactResult) -> None:
    equivalence = artifact.manifest["merge"]["equivalence"] or {}
    lora = " and `serve-lora.sh` (base + adapter)" if "serve-lora.sh" in artifact.manifest["serving"]["files"] else ""
    create_markdown_artifact(
        key="artifact",
        markdown=f"""# Artifact: {recipe.name}
- path: `{artifact.path}`
- serve with vLLM: `{artifact.path}/serve.sh` (merged){lora}; Kubernetes: `k8s/vllm.yaml`
- check: `ftpipe check-artifact {artifact.path}`
- merged vs adapter: max |logit diff| {equivalence.get('max_abs_logit_diff', 'n/a')} (tolerance {equivalence.get('tolerance', 'n/a')}), greedy match {equivalence.get('greedy_match', 'n/a')}
- adapter servable by vLLM: {artifact.manifest['adapter']['vllm_servable']}
""",
        description="vLLM-ready artifact",
    )


def publish_result(artifact: ArtifactResult, version: Version | None, outcome: dict | None) -> None:
    """The run's outcome as plain JSON (type "json"): what a platform team's client reads over the REST API
    (`POST /api/artifacts/filter`, key run-result) instead of parsing Markdown or Prefect's result storage."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.runtime import flow_run

    # through the client, not prefect.artifacts.Artifact, which stores data as a JSON-encoded string
    with get_client(sync_client=True) as client:
        client.create_artifact(artifact=ArtifactCreate(
            type="json", key="run-result", flow_run_id=flow_run.id, data=run_result(artifact, version, outcome),
            description="The artifact's path, its manifest and the registry version (JSON)"))


def run_result(artifact: ArtifactResult, version: Version | None, outcome: dict | None) -> dict:
    registered = None if version is None else {**version.to_dict(), "decision": (outcome or {}).get("outcome")}
    return json_safe({"artifact_path": artifact.path, "manifest": artifact.manifest, "registry": registered})


def json_safe(value: Any) -> Any:
    """Standard JSON: a NaN or infinity (a gate against a champion that does not exist) becomes null, as any JSON
    client reads it, instead of Python's non-standard `NaN`."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def ui_url(route: str) -> str | None:
    """The Prefect UI's address of a page (PREFECT_UI_URL, which Prefect derives from PREFECT_API_URL), or None on
    the embedded server, which has no UI."""
    from prefect.settings import PREFECT_UI_URL

    base = (PREFECT_UI_URL.value() or "").rstrip("/")
    return f"{base}/{route}" if base else None


def link_to_artifact(artifact_id, key: str) -> str:
    """A Markdown link to one artifact's page (this run's version, not the latest of its key), or its key as code."""
    url = ui_url(f"artifacts/artifact/{artifact_id}") if artifact_id else None
    return f"[{key}]({url})" if url else f"`{key}`"


def run_artifact_links(keys: tuple[str, ...]) -> str:
    """Links to this flow run's own artifacts with these keys (their latest versions), for a description."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.runtime import flow_run

    found: dict[str, str] = {}
    if flow_run.id:
        with get_client(sync_client=True) as client:
            for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=list(keys))),
                    sort=ArtifactSort.CREATED_DESC):
                found.setdefault(artifact.key, artifact.id)
    return ", ".join(link_to_artifact(found.get(key), key) for key in keys)


def publish_cost(recipe: Recipe, costs: dict) -> None:
    create_markdown_artifact(key="cost", markdown=f"# Cost: {recipe.name}\n\nStages that came from the cache cost nothing this "
                             f"run; the artifact's cost counts them as recorded when they ran.\n\n{cost_markdown(costs)}", description="Device-seconds, cost and serving projection")
