"""compare_models: one recipe over several base models, ranked on the same rows, the best handed to finetune.

Each base trains and evaluates in its own subflow and run folder; the data stage runs once (in this flow) and
every subflow finds it in the cache. Training takes a slot of the "gpu" limit, so on one GPU the bases train one
after another even when compare.parallel lets their subflows run at once.
"""
from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from data_prep.prepare import source_fingerprint
from evaluation.costs import UsageMeter, cost_report
from evaluation.evaluate import Champion
from evaluation.gates import decide
from evaluation.leaderboard import best_of, entry, leaderboard_lines, metric_table, rank, summary_table, with_apis
from flows.failures import fails_cleanly
from flows.runlock import run_folder_lock
from flows.finetune import (DEFAULT_RECIPE, Overrides, RecipeName, _cache_refreshed, _validated, finetune, governed, prepare_data_task,
                            resolve_champion_task, run_folder, train_and_evaluate, with_export_scores)
from flows.publish import publish_cost
from recipes import Recipe, RecipeError, resolve_recipe


@flow(name="compare-models", persist_result=True, validate_parameters=False)
@fails_cleanly
def compare_models(recipe: RecipeName | Recipe = DEFAULT_RECIPE, bases: list[str] | None = None, overrides: Overrides = None,
                   output_dir: str = "runs", force: bool = False, apis: list[str] | None = None) -> dict:
    """Train the recipe on each base model, evaluate all on the same suites (safety included), rank them by the
    recipe's compare.objective and, with compare.promote_best, run the best through gates, export and approval.

    Args:
        recipe: a recipe shipped in recipes/ by name, or a whole recipe object
        bases: base models to compare (hub ids, local folders, tiny:<family>; id@revision pins a revision); default compare.bases
        overrides: fields to change, as nested sections or dotted paths
        output_dir: the folder that holds run folders and the registry
        force: run every stage again instead of reusing cached results
        apis: contenders (evaluation.contenders) ranked beside the candidates, as a reference
    """
    recipe = _validated(recipe, overrides, output_dir)
    require_apis(recipe, apis)
    if recipe.compare.promote_best:
        governed(recipe, output_dir)  # the best goes on to promotion: refuse now what would weaken its policy
    recipes = {base: recipe_for_base(recipe, base) for base in require_bases(recipe, bases)}
    with _cache_refreshed(force):
        _prepare_once(recipe, output_dir)
        champion = resolve_champion_task(recipe, output_dir)
        entries = _run_candidates(recipes, output_dir, champion, recipe.compare.parallel)
        ranked = rank(with_apis(entries, apis or []), recipe.compare)
        best = best_of(ranked)
        _publish_leaderboard(recipe, ranked, best)
        artifact = finetune(recipes[best["base"]], output_dir=output_dir) if best and recipe.compare.promote_best else None
    return {"leaderboard": ranked, "best": best["base"] if best else None, "artifact": artifact}


def require_apis(recipe: Recipe, apis: list[str] | None) -> None:
    """Each --api names a contender of the recipe (an input error otherwise, before anything is trained)."""
    known = [c.name for c in recipe.evaluation.contenders]
    if unknown := [name for name in apis or [] if name not in known]:
        raise RecipeError([f"--api {unknown[0]}: not a contender of recipe {recipe.name} (evaluation.contenders: "
                           f"{', '.join(known) or 'none'})"])


def require_bases(recipe: Recipe, bases: list[str] | None) -> list[str]:
    """The bases to compare: those given (checked by the schema's compare.bases rules), else the recipe's
    compare.bases; none is an input error."""
    chosen = resolve_recipe(recipe, {"compare.bases": list(bases)}).compare.bases if bases else recipe.compare.bases
    if not chosen:
        raise RecipeError(["compare.bases: name the base models to compare (or pass bases / --base)"])
    return chosen


def recipe_for_base(recipe: Recipe, base: str) -> Recipe:
    """The recipe with model.base (and model.revision, from id@revision) replaced, validated like a file."""
    model_id, _, revision = base.partition("@")
    return resolve_recipe(recipe, {"model.base": model_id, "model.revision": revision or None})


def _prepare_once(recipe: Recipe, output_dir: str) -> None:
    """The shared data stage, before any subflow: each finds it in the cache instead of preparing it again."""
    run_dir = run_folder(recipe, output_dir)
    with run_folder_lock(run_dir, "compare-models data stage"):
        prepare_data_task(recipe, run_dir, source_fingerprint(recipe.data))


def _run_candidates(recipes: dict[str, Recipe], output_dir: str, champion: Champion | None, parallel: int) -> list[dict]:
    if parallel == 1:
        return [compare_candidate(r, base, output_dir, champion) for base, r in recipes.items()]
    _import_model_libraries()
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="compare") as pool:
        # each thread carries this flow's context, so the candidates are its subflows
        futures = [pool.submit(contextvars.copy_context().run, compare_candidate, r, base, output_dir, champion)
                   for base, r in recipes.items()]
        return [future.result() for future in futures]


def _import_model_libraries() -> None:
    """Resolve transformers' and peft's lazily imported names once, before candidate threads do it at the same time:
    transformers' lazy module can answer a concurrent first `from transformers import AutoConfig` with ImportError
    (seen in the compare-models deployment test)."""
    import peft  # noqa: F401
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast,  # noqa: F401
                              Trainer, TrainerCallback, set_seed)


@flow(name="compare-candidate", flow_run_name="{base}", persist_result=True, validate_parameters=False)
@fails_cleanly
def compare_candidate(recipe: Recipe, base: str, output_dir: str, champion: Champion | None) -> dict:
    """One base model: train, evaluate, decide the gates (without stopping), meter its cost."""
    meter = UsageMeter()
    with run_folder_lock(run_folder(recipe, output_dir), f"compare candidate {base}"), meter.active():
        candidate = train_and_evaluate(recipe, output_dir, champion)
        evaluation = with_export_scores(recipe, candidate)
    decision = decide(recipe.evaluation.gates, evaluation.gated(), evaluation.base, evaluation.champion, evaluation.interval)
    costs = cost_report(recipe.cost, meter.to_list(), candidate.run_dir, candidate.data.train_rows, evaluation.generation.get("candidate"),
                          evaluation, recipe.compare.objective)
    publish_cost(recipe, costs)
    return entry(base, str(candidate.run_dir), evaluation, decision, candidate.trained.metrics, costs, recipe.compare.objective)


def _publish_leaderboard(recipe: Recipe, ranked: list[dict], best: dict | None) -> None:
    section = recipe.compare
    verdict = (f"best: {best['base']} ({section.objective} {best['objective_value']:.4g})" if best
               else "no candidate can be best: " + "; ".join(f"{r['base']}: {r['why_not']}" for r in ranked))
    create_table_artifact(key="leaderboard", table=summary_table(ranked),
                          description=f"{recipe.name}: bases ranked by {section.objective}"
                          f"{' among those passing the gates' if section.require_gates else ''}; {verdict}")
    create_table_artifact(key="leaderboard-metrics", table=metric_table(ranked),
                          description="Every metric of every candidate, before fine-tuning, and against the production model")
    create_markdown_artifact(key="leaderboard-summary", description="Comparison verdict",
                             markdown=f"# {recipe.name}: {verdict}\n\n```\n" + "\n".join(leaderboard_lines(ranked)) + "\n```\n")
