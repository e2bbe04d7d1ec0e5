"""watch-releases: when a candidate base appears or changes, tune the recipe on it and open a review if it beats
production beyond noise; otherwise record why not. Scheduled by `ftpipe serve --watch RECIPE`.

What was seen is kept in the model's audit log (`release_check` entries), so a check is never repeated for a base
that has not changed and the record of every check (and its reason) cannot be edited away. The review is the normal
promotion path (gates, export, registry, approval by the model's policy's reviewers), with approval required.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from evaluation.leaderboard import best_of
from evaluation.releases import base_fingerprint, cost_difference, last_seen, review_verdict
from flows.compare import compare_models, recipe_for_base, require_bases
from flows.failures import fails_cleanly
from flows.finetune import DEFAULT_RECIPE, Overrides, RecipeName, _flow_run_label, _validated, finetune, governed
from recipes import Recipe, RecipeError, resolve_recipe
from serving.registry import PRODUCTION, registry_for


@flow(name="watch-releases", persist_result=True, validate_parameters=False)
@fails_cleanly
def watch_releases(recipe: RecipeName | Recipe = DEFAULT_RECIPE, bases: list[str] | None = None, overrides: Overrides = None,
                   output_dir: str = "runs") -> dict:
    """Check the candidate bases for new releases; tune and compare the new ones against production; open a review
    (a finetune run paused for approval) for the best when it is better beyond noise.

    Args:
        recipe: a recipe shipped in recipes/ by name, or a whole recipe object
        bases: candidate base models (hub ids with @revision, local folders); default compare.bases
        overrides: fields to change, as nested sections or dotted paths
        output_dir: the folder that holds run folders and the registry
    """
    recipe = _validated(recipe, overrides, output_dir)
    governed(reviewed(recipe), output_dir)  # the review is a promotion: refuse now what would weaken its policy
    store = registry_for(recipe.registry.uri, output_dir)
    chosen = require_bases(recipe, bases)
    try:
        fingerprints = {base: base_fingerprint(base) for base in chosen}
    except ValueError as exc:
        raise RecipeError([str(exc)]) from None
    seen = last_seen(store.events(recipe.name))
    changed = [base for base in chosen if seen.get(base) != fingerprints[base]]
    if not changed:
        return {"changed": [], "review": False, "why": "no base appeared or changed since the last check"}
    compared = compare_models(resolve_recipe(recipe, {"compare.promote_best": False}), bases=changed, output_dir=output_dir)
    ranked = compared["leaderboard"]
    best = best_of(ranked)
    production = store.resolve(recipe.name, PRODUCTION)
    production_manifest = store.manifest(production) if production else None
    review, why = review_verdict(best, ranked, recipe.compare.objective, production_manifest)
    check = {"checked": {base: fingerprints[base] for base in changed}, "production": production.version if production else None,
             "best": best["base"] if best else None, "objective": recipe.compare.objective,
             "objective_vs_production": best.get("objective_vs_champion") if best else None,
             "cost": cost_difference(best, production_manifest), "review": review, "why": why}
    entry = store.append(recipe.name, "release_check", _flow_run_label(), check)
    create_markdown_artifact(key="release-check", markdown=release_markdown(recipe, check, entry.seq),
                             description=f"{recipe.name}: {'review opened' if review else 'no review'}: {why}")
    artifact = finetune(reviewed(recipe, best["base"]), output_dir=output_dir) if review else None
    return {"changed": changed, "review": review, "why": why, "artifact": artifact, "audit_entry": entry.seq}


def reviewed(recipe: Recipe, base: str | None = None) -> Recipe:
    """The recipe (on the better base), with approval required: promotion waits for the policy's reviewers."""
    return resolve_recipe(recipe_for_base(recipe, base) if base else recipe, {"approval.required": True})


def release_markdown(recipe: Recipe, check: dict, seq: int) -> str:
    cost = check["cost"]
    costs = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in cost.items()) or "- n/a"
    bases = "\n".join(f"- `{b}`: {f}" for b, f in check["checked"].items())
    return f"""# {recipe.name}: release check ({'REVIEW OPENED' if check['review'] else 'no review'})

{check['why']}

Production: version {check['production'] or '-'}; best new candidate: {check['best'] or '-'}.

## New or changed bases
{bases}

## Cost (USD)
{costs}

Recorded as audit entry {seq} of `{recipe.name}` (`ftpipe registry log {recipe.name}`).
"""
