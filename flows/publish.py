"""What a person reads in the Prefect UI for each stage, published by the flow itself (not inside the cached
tasks), so a re-run whose stages end Cached shows the same reports."""
from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from data_prep.prepare import PreparedData
from evaluation.costs import cost_markdown
from evaluation.evaluate import EvalResult
from flows.reports import EXAMPLES_SHOWN, data_report_markdown, evaluation_table, example_table, safety_table, training_summary_markdown
from recipes import Recipe
from serving.export import ArtifactResult
from training.train import TrainResult


def publish_data(data: PreparedData) -> None:
    create_markdown_artifact(key="data-report", markdown=data_report_markdown(data), description="Data preparation report")


def publish_training(recipe: Recipe, trained: TrainResult) -> None:
    create_markdown_artifact(key="training-summary", description="Training summary",
                             markdown=training_summary_markdown(recipe.name, trained, recipe.training.adapter, recipe.training.lora.r))


def publish_evaluation(recipe: Recipe, result: EvalResult) -> None:
    create_table_artifact(key="evaluation", table=evaluation_table(result), description=_evaluation_caption(result))
    create_table_artifact(key="evaluation-examples", table=example_table(result.report_path),
                          description=f"Per-example outputs (first {EXAMPLES_SHOWN} of each suite), with the candidate's win, loss or tie")
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
    return caption + f". Every example's outputs: {result.report_path}"


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


def publish_cost(recipe: Recipe, costs: dict) -> None:
    create_markdown_artifact(key="cost", markdown=f"# Cost: {recipe.name}\n\nStages that came from the cache cost nothing this "
                             f"run; the artifact's cost counts them as recorded when they ran.\n\n{cost_markdown(costs)}", description="Device-seconds, cost and serving projection")
