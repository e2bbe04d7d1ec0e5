"""The `ftpipe` command line: validate, schema, prepare, run.

Exit codes of `ftpipe run` (and `ftpipe prepare`): 0 success, 1 a gate rejected the model, 2 invalid recipe or input data,
3 the run failed for another reason (the message and the Prefect flow run say why).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from recipes import Recipe, RecipeError, load_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
STAGE_LOGGERS = "data_prep,training,evaluation,serving"

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_FAILED = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except RecipeError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftpipe", description="Fine-tuning pipeline for open-weight LLMs, orchestrated by Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a recipe and print its resolved summary")
    _recipe_args(validate)
    validate.set_defaults(handler=_validate)

    schema = sub.add_parser("schema", help="print the recipe's JSON schema")
    schema.set_defaults(handler=_schema)

    run = sub.add_parser("run", help="run the finetune flow: data -> train -> evaluate -> gate -> export")
    _recipe_args(run)
    run.add_argument("--output-dir", default="runs", help="folder that holds run folders (default: ./runs)")
    run.set_defaults(handler=_run)

    prepare = sub.add_parser("prepare", help="run the data stage alone, into the folder `ftpipe run` would use")
    _recipe_args(prepare)
    prepare.add_argument("--output-dir", default="runs", help="folder that holds run folders (default: ./runs)")
    prepare.set_defaults(handler=_prepare)
    return parser


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, or the name of one in recipes/ (e.g. quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field, e.g. --set training.epochs=2 (repeatable)")


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.exists() and (RECIPES_DIR / f"{name_or_path}.yaml").is_file():
        return RECIPES_DIR / f"{name_or_path}.yaml"
    return path


def _load(args) -> Recipe:
    return load_recipe(resolve_recipe_path(args.recipe), args.overrides)


def _validate(args) -> int:
    print(summary(_load(args)))
    return EXIT_OK


def summary(recipe: Recipe) -> str:
    """One screen: what will run, on what, with which gates."""
    t, e, d = recipe.training, recipe.evaluation, recipe.data
    length = f"max_steps={t.max_steps}" if t.max_steps else f"epochs={t.epochs:g}"
    gates = ", ".join(f"{g.metric} {g.kind}={g.threshold:g}" for g in e.gates) or "none"
    lines = [
        f"recipe: {recipe.name} (valid)",
        f"model: {recipe.model.base}" + (f" @ {recipe.model.revision}" if recipe.model.revision else ""),
        f"data: {len(d.sources)} source(s): " + ", ".join(s.name for s in d.sources),
        "eval: " + (", ".join(s.name for s in d.eval_sources) if d.eval_sources else f"{d.eval_fraction:g} split (seed {d.seed})")
        + f", max {e.max_samples} samples",
        f"training: {t.method} {t.adapter} r={t.lora.r} alpha={t.lora.alpha} targets={t.lora.target_modules} backend={t.backend}",
        f"          {length} lr={t.learning_rate:g} batch={t.batch_size}x{t.gradient_accumulation_steps} "
        f"max_seq_length={t.max_seq_length} packing={t.packing} seed={t.seed}",
        f"gates: {gates}",
        f"export: dtype={recipe.export.dtype} merged={recipe.export.merged} adapter={recipe.export.adapter}",
        f"tracking: wandb {recipe.tracking.mode}",
    ]
    return "\n".join(lines)


def _schema(args) -> int:
    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return EXIT_OK


def _run(args) -> int:
    _route_stage_logs()  # before Prefect is imported: it reads its logging settings then
    from flows.finetune import finetune

    return _run_flow(finetune, args, "artifact")


def _prepare(args) -> int:
    _route_stage_logs()
    from flows.finetune import prepare

    return _run_flow(prepare, args, "data")


def _run_flow(flow, args, label: str) -> int:
    recipe = _load(args)
    state = flow(recipe, output_dir=args.output_dir, return_state=True)
    if state.is_completed():
        print(f"{label}: {state.result()}")
        return EXIT_OK
    error = state.result(raise_on_failure=False)
    code = exit_code_for(error)
    print(f"error: {error}" if isinstance(error, BaseException) else f"error: flow run ended {state.name}: {state.message}", file=sys.stderr)
    return code


def _route_stage_logs() -> None:
    """Stages log with `logging`; Prefect shows and stores those loggers' INFO lines in the flow run."""
    import logging

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", STAGE_LOGGERS)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded server's 20 s default is too short on a busy 2-core machine (seen while tests ran beside it)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for name in STAGE_LOGGERS.split(","):
        logging.getLogger(name).setLevel(logging.INFO)


def exit_code_for(error: object) -> int:
    from data_prep.formats import RowError
    from data_prep.readers import DataError
    from evaluation.gates import GateRejected
    from training.families import UnsupportedFamilyError
    from training.models import ModelLoadError
    from training.tokenize import MaskingError

    if isinstance(error, GateRejected):
        return EXIT_GATE
    if isinstance(error, (RecipeError, DataError, RowError, ModelLoadError, MaskingError, UnsupportedFamilyError)):
        return EXIT_INPUT
    return EXIT_FAILED


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
