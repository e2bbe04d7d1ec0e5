"""The `finetune` Prefect flow: one thin task per stage; cache keys and retries live in flows/caching.py, the UI's
reports in flows/publish.py."""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, task
from pydantic import WithJsonSchema
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

from data_prep.prepare import PreparedData, prepare_data, read_jsonl, redacted_section, source_fingerprint
from evaluation.costs import UsageMeter, cost_report, gpus_in_use, metered, stage_usage
from evaluation.evaluate import Champion, EvalResult, compare_with_champion, score_base_and_candidate
from evaluation.gates import GateDecision, GateRejected, decide
from evaluation.monitor import canary_suite
from evaluation.served import score_served
from recipes import Recipe, RecipeError, recipe_hash, recipe_names, resolve_recipe
from recipes.overrides import overrides_json_schema
from recipes.preflight import recipe_problems
from governance.runs import RunGovernance, govern, local_login
from serving.export import ArtifactResult, export_artifact, record_in_manifest
from serving.quantize import quantize_and_score, unquantized_name
from serving.registry import PRODUCTION, Registry, Version, registry_for
from flows.approval import PromotionRefused, not_required, refusal_message, wait_for_decision
from flows.caching import RETRIES, StageCache
from flows.failures import fails_cleanly, quiet_expected_tracebacks
from flows.publish import publish_artifact, publish_cost, publish_data, publish_evaluation, publish_result, publish_training
from flows.runlock import run_folder_lock
from flows.reports import approval_form_markdown, approval_request_markdown, approval_result_markdown, serving_parity_table
from training.models import BaseModelRef
from training.tracking import log_evaluation
from training.progress import ProgressMeter, StepReport
from training.train import TrainResult, filter_for_model, resolve_base_for, train

quiet_expected_tracebacks()  # in a deployment's run process too: it imports this module to run the flow
GPU_LIMIT = "gpu"  # the global concurrency limit that caps training tasks running at once (`ftpipe serve --gpus N`)
# The slot is leased and renewed while training runs: a killed process stops renewing and the server frees the slot
# within this (Prefect's minimum) plus its repossessor's 15 s loop, instead of the 5-minute default.
GPU_LEASE_S = 60
PROGRESS_UPDATE_S = 1.0  # the least time between two updates of the training-progress artifact
# The recipes shipped in recipes/, as the Prefect form's drop-down; an inline recipe object is the other choice.
RecipeName = Enum("RecipeName", {name: name for name in recipe_names()}, type=str)
DEFAULT_RECIPE = RecipeName("quickstart")
# What a run may override, as a schema Prefect checks when the run is submitted (recipes/overrides.py)
Overrides = Annotated[dict[str, Any] | None, WithJsonSchema(overrides_json_schema())]


def run_folder(recipe: Recipe, output_dir: str | Path) -> Path:
    """<output_dir>/<name>-<hash of recipe + source files>: a changed recipe or source gets a new folder."""
    digest = hashlib.sha256(f"{recipe_hash(recipe)}\x00{source_fingerprint(recipe.data)}".encode()).hexdigest()
    return Path(output_dir).resolve() / f"{recipe.name}-{digest[:12]}"


@task(name="prepare-data", cache_policy=StageCache(sections={"data": set()}), persist_result=True, **RETRIES)
@metered("prepare-data", children=True)
def prepare_data_task(recipe: Recipe, run_dir: Path, sources: str) -> PreparedData:
    """Read, validate, quarantine, clean, de-duplicate and split the data (`sources`: the files' fingerprint)."""
    return prepare_data(recipe.data, run_dir / "data")


@task(name="resolve-model", cache_policy=StageCache(sections={"model": set()}), persist_result=True, **RETRIES)
@metered("resolve-model")
def resolve_model_task(recipe: Recipe, data: PreparedData) -> BaseModelRef:
    """Find the base model (or build the tiny one from the prepared text, keyed by the data's cache key)."""
    return resolve_base_for(recipe.model, data)


@task(name="filter-tokens", cache_policy=StageCache(sections={"data": set(), "model": set(), "training": set()}), persist_result=True, **RETRIES)
@metered("filter-tokens")
def filter_tokens_task(recipe: Recipe, data: PreparedData, base: BaseModelRef) -> PreparedData:
    """Token-length filter with the model's tokenizer and chat template."""
    return filter_for_model(data, recipe.data, recipe.model, recipe.training, base)


@task(name="train", cache_policy=StageCache(sections={"training": set(), "model": set()}), persist_result=True, **RETRIES)
def train_task(recipe: Recipe, data: PreparedData, base: BaseModelRef, run_dir: Path) -> TrainResult:
    """Train the LoRA/QLoRA adapter under the "gpu" concurrency limit; a retry resumes from the last checkpoint."""
    progress = create_progress_artifact(progress=0.0, key="training-progress", description="Training: loading the model and data")
    meter, shown_at = ProgressMeter(), 0.0

    def on_progress(report: StepReport) -> None:
        nonlocal shown_at
        if report.step < report.total and time.monotonic() - shown_at < PROGRESS_UPDATE_S:
            return  # a fast run logs many steps a second: the UI needs one update a second, the API no more
        shown_at = time.monotonic()
        percent, description = meter.describe(report)
        update_progress_artifact(progress, progress=percent, description=f"Training: {description}")

    with concurrency(GPU_LIMIT, occupy=1, lease_duration=GPU_LEASE_S), stage_usage("train", gpus_in_use(recipe.training.distributed.num_processes)) as usage:
        held_from = _utc_now()
        trained = train(recipe.training, recipe.model, recipe.tracking, data, run_dir / "training", base=base,
                        run_name=recipe.name, run_config=recipe.model_dump(mode="json"), on_progress=on_progress)
        usage.cpu_s = trained.metrics["worker_cpu_s"]
    trained.metrics["gpu_slot"] = {"limit": GPU_LIMIT, "held_from": held_from, "held_until": _utc_now()}
    update_progress_artifact(progress, progress=100.0, description=f"Training done: {trained.metrics['steps']} steps")
    return trained


@task(name="resolve-champion", **RETRIES)
def resolve_champion_task(recipe: Recipe, output_dir: str) -> Champion | None:
    """The registry's production model for this recipe's name, as a local folder (None for a first version)."""
    if not (recipe.registry.enabled and recipe.registry.compare_with_champion):
        return None
    registry = registry_for(recipe.registry.uri, output_dir)
    production = registry.resolve(recipe.name, PRODUCTION)
    if production is None:
        return None
    path = registry.local_copy(production, Path(output_dir) / ".registry-cache")
    return Champion(model=recipe.name, version=production.version, path=str(path))


@task(name="evaluate", cache_policy=StageCache(sections={"evaluation": {"gates"}, "model": set()}), persist_result=True, **RETRIES)
@metered("evaluate", gpus=1)
def evaluate_task(recipe: Recipe, trained: TrainResult, data: PreparedData, run_dir: Path) -> EvalResult:
    """Score the base model and the candidate on the same held-out rows and safety probes."""
    result = score_base_and_candidate(recipe.evaluation, recipe.model, trained, data, run_dir / "eval")
    log_evaluation(trained.metrics.get("wandb"), {f"eval/{who}_{k}": v for who, values in (("base", result.base), ("candidate", result.candidate))
                                                   for k, v in values.items()})
    return result


@task(name="compare-champion", cache_policy=StageCache(sections={"evaluation": {"gates"}}), persist_result=True, **RETRIES)
@metered("compare-champion", gpus=1)
def compare_champion_task(recipe: Recipe, trained: TrainResult, evaluation: EvalResult, data: PreparedData, run_dir: Path,
                          champion: Champion | None) -> EvalResult:
    """Score the production model on the same rows (re-run only when another version is promoted)."""
    result = compare_with_champion(evaluation, recipe.evaluation, data, champion, run_dir / "eval", trained.adapter_path)
    if result.champion:
        log_evaluation(None, {f"eval/champion_{k}": v for k, v in result.champion.items()})
    return result


@task(name="quantize", cache_policy=StageCache(sections={"export": set(), "evaluation": {"gates"}, "model": set()}),
      persist_result=True, **RETRIES)
@metered("quantize", gpus=1, children=True)
def quantize_task(recipe: Recipe, trained: TrainResult, data: PreparedData, evaluation: EvalResult, run_dir: Path) -> EvalResult:
    """The quantized export (export.quantize) made and scored against the 16-bit candidate, before the gates."""
    result = quantize_and_score(recipe.export, recipe.evaluation, recipe.model, trained, data, evaluation, run_dir / "quantized")
    info = result.quantization
    create_table_artifact(key="quantization", table=[
        {"metric": key, "16-bit": round(result.candidate[unquantized_name(key)], 4) if key in info["delta"] else "",
         info["scheme"]: round(value, 4), "delta": info["delta"].get(key, "")} for key, value in result.quantized.items()],
        description=f"{info['scheme']} export ({info['format']}, {info['weights_bytes'] / info['unquantized_weights_bytes']:.0%} of the "
                    f"16-bit weights' bytes) against the 16-bit candidate on {info['examples']} held-out rows")
    return result


@task(name="serve-and-score", cache_policy=StageCache(sections={"export": set(), "evaluation": {"gates"}, "model": set()}),
      persist_result=True, **RETRIES)
@metered("serve-and-score", gpus=1, children=True)
def serve_task(recipe: Recipe, trained: TrainResult, data: PreparedData, evaluation: EvalResult, run_dir: Path) -> EvalResult:
    """The merged candidate behind a local OpenAI-compatible server (evaluation.serve), scored as it will be served."""
    result = score_served(recipe.evaluation, recipe.export, recipe.model, trained, data, evaluation, run_dir / "served")
    create_table_artifact(key="serving-parity", table=serving_parity_table(result),
                          description=f"The candidate as served ({result.served['server']}) against the in-process candidate: "
                                      f"{result.served['parity_line']}")
    return result


@task(name="gate")
def gate_task(recipe: Recipe, evaluation: EvalResult, governance: RunGovernance) -> GateDecision:
    """Apply the recipe's gates and the policy's mandatory ones; the result goes to the model's audit log, and a
    failure stops the flow before export."""
    decision = decide(governance.gates, evaluation.gated(), evaluation.base, evaluation.champion, evaluation.interval)
    create_table_artifact(
        key="gate-decision",
        table=[{"gate": r.describe(), "passed": r.passed} for r in decision.results] or [{"gate": "none configured", "passed": True}],
        description="Gate decision: " + ("PASSED" if decision.passed else decision.failure_message()),
    )
    if recipe.registry.enabled:
        _registry(governance).append(recipe.name, "gates", _flow_run_label(), {"run": _flow_run_label(), **decision.to_dict(),
                                             "mandatory": [g.model_dump(exclude_none=True) for g in governance.policy.gates]})
    if not decision.passed:
        raise GateRejected(decision.failure_message())
    return decision


def manifest_recipe(recipe: Recipe) -> dict:
    """The recipe as the manifest and the model card record it: its data section through the data stage's redactor
    (a system prompt or a source name can hold personal data); recipe_hash is still the hash of the recipe as run."""
    return {**recipe.model_dump(mode="json"), "data": redacted_section(recipe.data)}


@task(name="export", cache_policy=StageCache(sections={"*": set()}, ignore={"started_at"}), persist_result=True, **RETRIES)
@metered("export", gpus=1)
def export_task(recipe: Recipe, trained: TrainResult, data: PreparedData, evaluation: EvalResult,
                decision: GateDecision, run_dir: Path, started_at: str) -> ArtifactResult:
    """Merge, check and write the vLLM-ready artifact."""
    lineage = {
        "name": recipe.name,
        "run_started_at": started_at,
        "recipe": manifest_recipe(recipe),
        "recipe_hash": recipe_hash(recipe),
        "data": {"fingerprint": data.fingerprint, "train_rows": data.train_rows, "eval_rows": data.eval_rows,
                 "quarantined_rows": data.quarantined_rows, "report": data.report_path},
        "evaluation": evaluation.to_dict(),
        "gates": decision.to_dict(),
        "max_seq_length": recipe.training.max_seq_length,
    }
    canary = canary_suite(recipe, read_jsonl(data.eval_path), json.loads(Path(evaluation.report_path).read_text()))
    return export_artifact(recipe.export, recipe.model, trained, data.eval_path, lineage, run_dir, canary)


@task(name="record-cost", **RETRIES)
def record_cost_task(artifact: ArtifactResult, costs: dict) -> ArtifactResult:
    """The run's device-seconds and cost, and the serving projection, in the manifest and the model card."""
    return ArtifactResult(path=artifact.path, manifest=record_in_manifest(artifact.path, "cost", costs))


@task(name="register", **RETRIES)
def register_task(recipe: Recipe, artifact: ArtifactResult, governance: RunGovernance) -> Version:
    """Copy the artifact into the registry as the next version (its files verified first) and point `candidate` at it."""
    registry = _registry(governance)
    version = registry.register(recipe.name, artifact.path, by=_flow_run_label())
    create_markdown_artifact(key="registry-candidate", description="Registered as the candidate",
                             markdown=f"# Registered: {recipe.name} version {version.version}\n`{version.url}` in `{registry.uri}` "
                             f"(`ftpipe registry list {recipe.name} --registry {registry.uri}`)")
    return version


@task(name="promote")
def promote_task(recipe: Recipe, governance: RunGovernance, version: Version, outcome: dict) -> dict | None:
    """Record the approval outcome in the audit log and move `production` when it allows (the registry checks the log
    and the version's files again, whatever this run says)."""
    registry = _registry(governance)
    registry.append(recipe.name, "approval", _flow_run_label(), {"version": version.version, "run": _flow_run_label(), **outcome})
    if outcome["outcome"] not in ("approved", "not required"):
        return None
    who = ", ".join(f"{a['reviewer']} ({a['credential_id']})" for a in outcome["approvers"]) or "nobody: approval not required"
    return registry.promote(recipe.name, version.version, by=who, reason=f"{outcome['outcome']} in {_flow_run_label()}")


def _registry(governance: RunGovernance) -> Registry:
    return Registry(governance.registry_uri)


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else "ftpipe"


@task(name="benchmarks", cache_policy=StageCache(sections={"evaluation": set()}), persist_result=True, **RETRIES)
@metered("benchmarks", gpus=1)
def benchmarks_task(recipe: Recipe, trained: TrainResult, artifact: ArtifactResult, run_dir: Path) -> dict:
    """lm-evaluation-harness tasks on the base model and the merged artifact, recorded in the manifest."""
    from evaluation.benchmarks import run_lm_eval

    scores = run_lm_eval(recipe.evaluation.lm_eval, {"base": trained.base.path, "candidate": str(Path(artifact.path) / "model")},
                         run_dir / "eval")
    record_in_manifest(artifact.path, "benchmarks", scores)
    create_table_artifact(key="benchmarks", description="lm-evaluation-harness on the base model and the merged artifact",
                          table=[{"task": task, "metric": metric, "base": scores["base"].get(task, {}).get(metric), "candidate": value}
                                 for task, metrics in scores["candidate"].items() for metric, value in metrics.items()])
    return scores


@flow(name="finetune", persist_result=True, validate_parameters=False)
@fails_cleanly
def finetune(recipe: RecipeName | Recipe = DEFAULT_RECIPE, overrides: Overrides = None, output_dir: str = "runs",
             force: bool = False) -> str:
    """Data -> training -> evaluation (base, candidate, champion) -> gates -> export -> registry candidate -> the
    reviewer's decision -> production; returns the artifact folder.

    Args:
        recipe: a recipe shipped in recipes/ by name, or a whole recipe object (every section, validated like a file)
        overrides: fields to change, as nested sections ({"training": {"epochs": 2}}) or dotted paths ({"training.lora.r": 8})
        output_dir: the folder that holds run folders and the registry, on the machine that runs the flow
        force: run every stage again instead of reusing cached results
    """
    recipe = _validated(recipe, overrides, output_dir)
    governance = governed(recipe, output_dir)  # before any work
    with _cache_refreshed(force):
        return _finetune(recipe, governance, output_dir)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Candidate:
    """A base model trained and evaluated with the recipe: what the gates, a leaderboard and export read."""

    run_dir: Path
    data: PreparedData
    trained: TrainResult
    evaluation: EvalResult


def train_and_evaluate(recipe: Recipe, output_dir: str, champion: Champion | None) -> Candidate:
    """Data -> training -> evaluation of base, candidate and champion, each stage cached and its usage metered."""
    run_dir = run_folder(recipe, output_dir)
    data, base = _prepared(recipe, run_dir)
    trained = train_task(recipe, data, base, run_dir)
    publish_training(recipe, trained)
    evaluation = evaluate_task(recipe, trained, data, run_dir)
    evaluation = compare_champion_task(recipe, trained, evaluation, data, run_dir, champion)
    publish_evaluation(recipe, evaluation)
    return Candidate(run_dir, data, trained, evaluation)


def with_export_scores(recipe: Recipe, candidate: Candidate) -> EvalResult:
    """The candidate's evaluation, with the scores of its quantized export (export.quantize) and of the merged model
    as served (evaluation.serve) where the recipe asks for them: both are gated with the rest."""
    evaluation = candidate.evaluation
    if recipe.export.quantize != "none":
        evaluation = quantize_task(recipe, candidate.trained, candidate.data, evaluation, candidate.run_dir)
    if recipe.evaluation.serve != "none":
        evaluation = serve_task(recipe, candidate.trained, candidate.data, evaluation, candidate.run_dir)
    return evaluation


def _finetune(recipe: Recipe, governance: RunGovernance, output_dir: str) -> str:
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meter = UsageMeter()
    with run_folder_lock(run_folder(recipe, output_dir), _flow_run_label()):  # released before the approval wait
        with meter.active():
            candidate = train_and_evaluate(recipe, output_dir, resolve_champion_task(recipe, output_dir))
            trained, evaluation = candidate.trained, with_export_scores(recipe, candidate)
            decision = gate_task(recipe, evaluation, governance)
            artifact = export_task(recipe, trained, candidate.data, evaluation, decision, candidate.run_dir, started_at)
            if recipe.evaluation.lm_eval.tasks:
                benchmarks_task(recipe, trained, artifact, candidate.run_dir)
        costs = cost_report(recipe.cost, meter.to_list(), candidate.run_dir, candidate.data.train_rows, evaluation.generation.get("candidate"),
                          evaluation, recipe.compare.objective)
        publish_cost(recipe, costs)
        if meter.ran("export"):  # a cached export keeps the cost of the run that made it
            artifact = record_cost_task(artifact, costs)
        publish_artifact(recipe, artifact)
        version = register_task(recipe, artifact, governance) if recipe.registry.enabled else None
    if version is None:
        publish_result(artifact, None, None)
        return artifact.path
    outcome = _decision(recipe, governance, version, evaluation, decision, artifact)
    moved = promote_task(recipe, governance, version, outcome)
    create_markdown_artifact(key="approval-request", markdown=approval_result_markdown(recipe, version, outcome, moved),
                             description=f"Decision: {outcome['outcome']}")
    publish_result(artifact, version, outcome)
    if outcome["outcome"] not in ("approved", "not required"):
        raise PromotionRefused(refusal_message(outcome))
    return artifact.path


def _decision(recipe: Recipe, governance: RunGovernance, version: Version, evaluation: EvalResult, decision: GateDecision,
              artifact: ArtifactResult) -> dict:
    """The reviewers' decision under the policy (every answer in the audit log), or "not required"."""
    if not governance.approval_required:
        return not_required(governance)
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    registry, submitter = _registry(governance), _submitter()

    def record(event: str, by: str, data: dict) -> None:
        registry.append(recipe.name, event, by, {"version": version.version, "run": _flow_run_label(), **data})

    record("approval_requested", _flow_run_label(), {"reviewers": governance.reviewers, "approvals": governance.approvals,
                                                     "timeout_hours": governance.timeout_hours, "submitter": submitter})
    get_run_logger().warning("waiting for %s: ftpipe approve %s --reviewer NAME [--reject] (token from $FTPIPE_REVIEWER_TOKEN or "
                             "--token-file), or the Resume form of this flow run", governance.describe(), flow_run.id)
    return wait_for_decision(governance, approval_request_markdown(recipe, governance, evaluation, decision, artifact.path, version),
                             approval_form_markdown(recipe, governance, version), submitter, record)


def _submitter() -> str | None:
    """Who started this run, where that is known: the local login for a run started here (`ftpipe run`), Prefect's
    created_by for a deployment run (set by Prefect Cloud; a self-hosted server records no caller)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return local_login()
    with get_client(sync_client=True) as client:
        created_by = client.read_flow_run(flow_run.id).created_by
    return created_by.display_value if created_by else None


def governed(recipe: Recipe, output_dir: str) -> RunGovernance:
    """The model's policy as it applies to this run; RecipeError (before any work) when the run would weaken it."""
    return govern(recipe, registry_for(recipe.registry.uri, output_dir) if recipe.registry.enabled else None)


def _validated(recipe: RecipeName | Recipe | dict | str, overrides: dict[str, Any] | None, output_dir: str | None = None) -> Recipe:
    """The recipe a run was given (name, object or mapping), overrides applied; refused with the recipe's own error
    lines, and before any work when training cannot start here or what it names is missing or unwritable."""
    from training.launch import launch_problems

    recipe = resolve_recipe(recipe, overrides)
    if problems := launch_problems(recipe.training.distributed) + recipe_problems(recipe, output_dir):
        raise RecipeError(problems)
    return recipe


def _cache_refreshed(force: bool):
    return temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}) if force else nullcontext()


def _prepared(recipe: Recipe, run_dir: Path) -> tuple[PreparedData, BaseModelRef]:
    data = prepare_data_task(recipe, run_dir, source_fingerprint(recipe.data))
    base = resolve_model_task(recipe, data)
    data = filter_tokens_task(recipe, data, base)
    publish_data(data)
    return data, base


@flow(name="prepare", persist_result=True, validate_parameters=False)
@fails_cleanly
def prepare(recipe: RecipeName | Recipe = DEFAULT_RECIPE, overrides: Overrides = None, output_dir: str = "runs",
            force: bool = False) -> str:
    """The data stage alone, into the same run folder `finetune` uses; returns the data folder.

    Args:
        recipe: a recipe shipped in recipes/ by name, or a whole recipe object
        overrides: fields to change, as nested sections or dotted paths
        output_dir: the folder that holds run folders
        force: prepare the data again instead of reusing the cached result
    """
    recipe = _validated(recipe, overrides, output_dir)
    run_dir = run_folder(recipe, output_dir)
    with _cache_refreshed(force), run_folder_lock(run_dir, _flow_run_label()):
        data, _ = _prepared(recipe, run_dir)
    return str(Path(data.train_path).parent)
