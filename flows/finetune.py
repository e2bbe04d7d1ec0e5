"""The `finetune` Prefect flow: one thin task per stage, each publishing what a person reads in the UI."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from data_prep.prepare import PreparedData, prepare_data, source_fingerprint
from evaluation.evaluate import Champion, EvalResult, evaluate
from evaluation.gates import GateDecision, GateRejected, decide
from recipes import Recipe, recipe_hash
from serving.export import ArtifactResult, export_artifact, record_in_manifest
from serving.registry import PRODUCTION, Version, registry_for
from flows.approval import PromotionRefused, not_required, refusal_message, wait_for_decision
from flows.reports import (EXAMPLES_SHOWN, approval_request_markdown, data_report_markdown, evaluation_table, example_table, safety_table,
                           training_summary_markdown)
from training.models import BaseModelRef
from training.tracking import log_evaluation
from training.train import TrainResult, filter_for_model, resolve_base_for, train


def run_folder(recipe: Recipe, output_dir: str | Path) -> Path:
    """<output_dir>/<name>-<hash of recipe + source files>: a changed recipe or source gets a new folder."""
    digest = hashlib.sha256(f"{recipe_hash(recipe)}\x00{source_fingerprint(recipe.data)}".encode()).hexdigest()
    return Path(output_dir).resolve() / f"{recipe.name}-{digest[:12]}"


@task(name="prepare-data")
def prepare_data_task(recipe: Recipe, run_dir: Path) -> PreparedData:
    """Read, validate, quarantine, clean, de-duplicate and split the data (reused when unchanged)."""
    return prepare_data(recipe.data, run_dir / "data")


@task(name="resolve-model")
def resolve_model_task(recipe: Recipe, data: PreparedData) -> BaseModelRef:
    """Find the base model (or build the tiny one from the prepared text, keyed by the data's cache key)."""
    return resolve_base_for(recipe.model, data)


@task(name="filter-tokens")
def filter_tokens_task(recipe: Recipe, data: PreparedData, base: BaseModelRef) -> PreparedData:
    """Token-length filter with the model's tokenizer and chat template; publish the data report."""
    data = filter_for_model(data, recipe.data, recipe.model, recipe.training, base)
    create_markdown_artifact(key="data-report", markdown=data_report_markdown(data), description="Data preparation report")
    return data


@task(name="train")
def train_task(recipe: Recipe, data: PreparedData, base: BaseModelRef, run_dir: Path) -> TrainResult:
    """Train the LoRA/QLoRA adapter; a progress artifact follows the steps, a summary ends the task."""
    progress = create_progress_artifact(progress=0.0, key="training-progress", description="Training progress (optimizer steps)")

    def on_progress(step: int, total: int) -> None:
        update_progress_artifact(progress, progress=round(100 * step / max(total, 1), 1), description=f"step {step} of {total}")

    trained = train(recipe.training, recipe.model, recipe.tracking, data, run_dir / "training", base=base,
                    run_name=recipe.name, run_config=recipe.model_dump(mode="json"), on_progress=on_progress)
    update_progress_artifact(progress, progress=100.0, description=f"done: {trained.metrics['steps']} steps")
    create_markdown_artifact(key="training-summary", description="Training summary",
                             markdown=training_summary_markdown(recipe.name, trained, recipe.training.adapter, recipe.training.lora.r))
    return trained


@task(name="resolve-champion")
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


@task(name="evaluate")
def evaluate_task(recipe: Recipe, trained: TrainResult, data: PreparedData, run_dir: Path, champion: Champion | None) -> EvalResult:
    """Score base, candidate and the production model (when there is one) on the same held-out rows."""
    result = evaluate(recipe.evaluation, recipe.model, trained, data, run_dir / "eval", champion)
    log_evaluation(trained.metrics.get("wandb"), {f"eval/{who}_{k}": v for who, values in
                                                   (("base", result.base), ("candidate", result.candidate), ("champion", result.champion or {}))
                                                   for k, v in values.items()})
    create_table_artifact(key="evaluation", table=evaluation_table(result), description=_evaluation_caption(result))
    create_table_artifact(key="evaluation-examples", table=example_table(result.report_path),
                          description=f"Per-example outputs (first {EXAMPLES_SHOWN} of each suite), with the candidate's win, loss or tie")
    if recipe.evaluation.safety.enabled:
        create_table_artifact(key="safety", table=safety_table(result.report_path),
                              description="Red-team and counterfactual bias probes: " + ", ".join(
                                  f"{k.removeprefix('safety.')} {result.base[k]:.3f} -> {result.candidate[k]:.3f}"
                                  for k in result.candidate if k.startswith("safety.")))
    return result


def _evaluation_caption(result: EvalResult) -> str:
    info = result.champion_info
    champion = ("no production model yet" if info is None else f"champion: production version {info['version']}"
                if info["evaluated"] else info["reason"])
    caption = ("Base vs candidate per metric (" + champion + "); rows per suite: " + ", ".join(f"{k} {v}" for k, v in result.examples.items())
               + "; candidate wins/losses/ties vs base per suite: " + ", ".join(f"{k} {o['win']}/{o['loss']}/{o['tie']}" for k, o in result.outcomes.items()))
    if result.outcomes_vs_champion:
        caption += "; vs champion: " + ", ".join(f"{k} {o['win']}/{o['loss']}/{o['tie']}" for k, o in result.outcomes_vs_champion.items())
    return caption + f". Every example's outputs: {result.report_path}"


@task(name="gate")
def gate_task(recipe: Recipe, evaluation: EvalResult) -> GateDecision:
    """Apply the recipe's gates; a failure stops the flow before export."""
    decision = decide(recipe.evaluation.gates, evaluation.candidate, evaluation.base, evaluation.champion)
    create_table_artifact(
        key="gate-decision",
        table=[{"gate": r.describe(), "passed": r.passed} for r in decision.results] or [{"gate": "none configured", "passed": True}],
        description="Gate decision: " + ("PASSED" if decision.passed else decision.failure_message()),
    )
    if not decision.passed:
        raise GateRejected(decision.failure_message())
    return decision


@task(name="export")
def export_task(recipe: Recipe, trained: TrainResult, data: PreparedData, evaluation: EvalResult,
                decision: GateDecision, run_dir: Path, started_at: str) -> ArtifactResult:
    """Merge, check and write the vLLM-ready artifact."""
    lineage = {
        "name": recipe.name,
        "run_started_at": started_at,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe_hash(recipe),
        "data": {"fingerprint": data.fingerprint, "train_rows": data.train_rows, "eval_rows": data.eval_rows,
                 "quarantined_rows": data.quarantined_rows, "report": data.report_path},
        "evaluation": evaluation.to_dict(),
        "gates": decision.to_dict(),
        "max_seq_length": recipe.training.max_seq_length,
    }
    artifact = export_artifact(recipe.export, recipe.model, trained, data.eval_path, lineage, run_dir)
    equivalence = artifact.manifest["merge"]["equivalence"] or {}
    create_markdown_artifact(
        key="artifact",
        markdown=f"""# Artifact: {recipe.name}
- path: `{artifact.path}`
- serve with vLLM: `{artifact.path}/serve.sh` (merged){' and `serve-lora.sh` (base + adapter)' if 'serve-lora.sh' in artifact.manifest['serving']['files'] else ''}; Kubernetes: `k8s/vllm.yaml`
- check: `ftpipe check-artifact {artifact.path}`
- merged vs adapter: max |logit diff| {equivalence.get('max_abs_logit_diff', 'n/a')} (tolerance {equivalence.get('tolerance', 'n/a')}), greedy match {equivalence.get('greedy_match', 'n/a')}
- adapter servable by vLLM: {artifact.manifest['adapter']['vllm_servable']}
""",
        description="vLLM-ready artifact",
    )
    return artifact


@task(name="register")
def register_task(recipe: Recipe, artifact: ArtifactResult, output_dir: str) -> Version:
    """Copy the artifact into the registry as the next version and point `candidate` at it."""
    registry = registry_for(recipe.registry.uri, output_dir)
    version = registry.register(recipe.name, artifact.path, by=_flow_run_label())
    record_in_manifest(artifact.path, "registry", {"uri": registry.uri, "model": recipe.name, "version": version.version})
    registry.update_files(version, artifact.path)
    create_link_artifact(key="registry-candidate", link=version.url, link_text=f"{recipe.name} version {version.version}",
                         description="Registered as the candidate")
    return version


@task(name="record-approval")
def record_approval_task(artifact: ArtifactResult, approval: dict, recipe: Recipe, version: Version | None, output_dir: str) -> dict:
    """Write the decision, reviewer and time into manifest.json and the model card (here and in the registry), and move
    `production` to the version when it was promoted."""
    manifest = record_in_manifest(artifact.path, "approval", approval)
    if version is not None:
        registry = registry_for(recipe.registry.uri, output_dir)
        registry.update_files(version, artifact.path)
        if approval["promoted"]:
            who = approval["reviewer"] or "nobody: approval not required (development recipe)"
            registry.promote(recipe.name, version.version, by=who, reason=f"{approval['decision']} in {_flow_run_label()}")
    return manifest


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else "ftpipe"


@task(name="benchmarks")
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


@flow(name="finetune")
def finetune(recipe: Recipe, output_dir: str = "runs") -> str:
    """Data -> training -> evaluation (base, candidate, champion) -> gates -> export -> registry candidate -> the
    reviewer's decision -> production; returns the artifact folder."""
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_dir = run_folder(recipe, output_dir)
    data, base = _prepared(recipe, run_dir)
    trained = train_task(recipe, data, base, run_dir)
    champion = resolve_champion_task(recipe, output_dir)
    evaluation = evaluate_task(recipe, trained, data, run_dir, champion)
    decision = gate_task(recipe, evaluation)
    artifact = export_task(recipe, trained, data, evaluation, decision, run_dir, started_at)
    if recipe.evaluation.lm_eval.tasks:
        benchmarks_task(recipe, trained, artifact, run_dir)
    version = register_task(recipe, artifact, output_dir) if recipe.registry.enabled else None
    if recipe.approval.required:
        approval = wait_for_decision(recipe.approval, approval_request_markdown(recipe, evaluation, decision, artifact.path, version))
    else:
        approval = not_required()
    record_approval_task(artifact, approval, recipe, version, output_dir)
    if not approval["promoted"]:
        raise PromotionRefused(refusal_message(approval))
    return artifact.path


def _prepared(recipe: Recipe, run_dir: Path) -> tuple[PreparedData, BaseModelRef]:
    data = prepare_data_task(recipe, run_dir)
    base = resolve_model_task(recipe, data)
    return filter_tokens_task(recipe, data, base), base


@flow(name="prepare")
def prepare(recipe: Recipe, output_dir: str = "runs") -> str:
    """The data stage alone, into the same run folder `finetune` uses; returns the data folder."""
    data, _ = _prepared(recipe, run_folder(recipe, output_dir))
    return str(Path(data.train_path).parent)
