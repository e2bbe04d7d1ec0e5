"""The `ftpipe` command line: validate, estimate, schema, prepare, run, serve, approve, registry, check-artifact, smoke.

Exit codes of `ftpipe run` (and `ftpipe prepare`): 0 success, 1 a gate or the reviewer rejected the model (or no decision came in
time), 2 invalid recipe or input data,
3 the run failed for another reason (the message and the Prefect flow run say why).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.cli_registry import add_commands as add_registry_commands, registry_errors
from flows.failures import EXIT_FAILED, EXIT_GATE, EXIT_INPUT, EXIT_OK, exit_code_for
from recipes import RECIPES_DIR, Recipe, RecipeError, load_recipe, recipe_names, recipe_path

GPU_CHOICES = ("h100", "a100-80g", "l4")  # training.estimate.GPUS, named here so the parser stays import-light
STAGE_LOGGERS = "data_prep,training,evaluation,serving,governance,flows.caching,flows.runlock"
SMOKE_SUITE = RECIPES_DIR / "data" / "support_tickets_heldout.jsonl"



def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _create_prefect_home()
    try:
        return args.handler(args)
    except RecipeError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_INPUT
    except registry_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:
        if (message := prefect_api_error(exc)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INPUT


def prefect_api_error(exc: BaseException) -> str | None:
    """What a refused or unreachable Prefect API means for the user, instead of a client library's traceback;
    None for any other error."""
    import httpx

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or "the embedded server"
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
        return (f"the Prefect server at {url} refused the request (401 Unauthorized): it was started with an auth string "
                "(PREFECT_SERVER_API_AUTH_STRING); give the same to this command with PREFECT_API_AUTH_STRING=user:password "
                "(or `prefect config set PREFECT_API_AUTH_STRING=...`)")
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the Prefect server at {url} answered {exc.response.status_code} to {exc.request.method} {exc.request.url.path}: {exc.response.text[:500]}"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return f"cannot reach the Prefect server at {url} ({exc}): start it (`prefect server start`) or fix PREFECT_API_URL"
    return None


def _create_prefect_home() -> None:
    """Prefect keeps its database under PREFECT_HOME but does not create a folder named there that is missing: its
    embedded server then fails to start with only "Timed out while attempting to connect". Create it, as Prefect
    creates its default ~/.prefect."""
    if home := os.environ.get("PREFECT_HOME"):
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftpipe", description="Fine-tuning pipeline for open-weight LLMs, orchestrated by Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a recipe and print its resolved summary")
    _recipe_args(validate)
    validate.add_argument("--gpu", choices=GPU_CHOICES, help="also warn when training will not fit this GPU's memory")
    validate.add_argument("--output-dir", default="runs", help="the folder runs will write to, checked for writability (default: ./runs)")
    validate.set_defaults(handler=_validate)

    estimate = sub.add_parser("estimate", help="parameters, peak GPU memory, tokens, time and cost of a recipe's training",
                              description=_estimate_rules())
    _recipe_args(estimate)
    estimate.add_argument("--gpu", choices=GPU_CHOICES, required=True)
    estimate.add_argument("--tokens-per-s", type=float, help="your measured training throughput (default: estimated)")
    estimate.add_argument("--usd-per-hour", type=float, help="the GPU's price (default: the stated on-demand price)")
    estimate.add_argument("--output-dir", default="runs", help="folder that holds run folders; the data is prepared there as `ftpipe prepare` would")
    estimate.formatter_class = argparse.RawDescriptionHelpFormatter
    estimate.set_defaults(handler=_estimate)

    schema = sub.add_parser("schema", help="print the recipe's JSON schema")
    schema.set_defaults(handler=_schema)

    run = sub.add_parser("run", help="run the finetune flow: data -> train -> evaluate -> gate -> export")
    _recipe_args(run)
    run.add_argument("--output-dir", default="runs", help="folder that holds run folders (default: ./runs)")
    run.add_argument("--force", action="store_true", help="run every stage again instead of reusing cached results")
    run.set_defaults(handler=_run)

    check = sub.add_parser("check-artifact", help="verify an exported artifact as vLLM would load it; one line per problem, exit 1 on any")
    check.add_argument("path", help="the artifact folder (runs/<run>/artifact, or a registry version folder)")
    check.add_argument("--vllm-python", help="also run vLLM's own code on it with this Python of a vLLM environment "
                       "(`ftpipe vllm-env`; default: $FTPIPE_VLLM_PYTHON)")
    check.add_argument("--rows", help="chat rows (JSONL, e.g. the run's data/eval.jsonl) vLLM renders and compares with training's "
                       "encoding (default: probe conversations)")
    check.set_defaults(handler=_check_artifact)

    vllm_env = _tool_env_parser(sub, "vllm-env", "vLLM for check-artifact --vllm-python", ".vllm",
                                "the one ftpipe runs with; `pinned`: the one vLLM pins", _vllm_env)
    vllm_env.add_argument("--full", action="store_true", help="every vLLM requirement, GPU kernels included (to run `vllm serve` on a GPU)")
    _tool_env_parser(sub, "quantize-env", "llm-compressor for export.quantize", ".quantize",
                     "2.13.0, whose CPU build needs no CUDA download; fp8_dynamic and w4a16 need no GPU to quantize", _quantize_env)

    smoke = sub.add_parser("smoke", help="send eval prompts to an OpenAI-compatible server: exact match and latency")
    smoke.add_argument("--base-url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    smoke.add_argument("--model", required=True, help="the served model name (vLLM: --served-model-name, the recipe's name)")
    smoke.add_argument("--suite", default=str(SMOKE_SUITE), help="eval rows in any data-source format (default: the quickstart's held-out sample)")
    smoke.add_argument("--limit", type=int, default=50, help="rows sent (default 50)")
    smoke.add_argument("--max-tokens", type=int, default=64, help="answer length limit per request (default 64)")
    smoke.add_argument("--min-exact-match", type=float, help="exit 1 when exact match is below this")
    smoke.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)")
    smoke.add_argument("--report", help="also write the full report (every answer and latency) to this JSON file")
    smoke.set_defaults(handler=_smoke)

    add_registry_commands(sub)

    serve = sub.add_parser("serve", help="serve the finetune and prepare deployments from this machine (needs PREFECT_API_URL)")
    serve.add_argument("--output-dir", default="runs", help="folder that holds run folders and the registry (default: ./runs)")
    serve.add_argument("--gpus", type=int, default=1, help="training tasks allowed at once: the `gpu` global concurrency limit (default 1)")
    serve.add_argument("--limit", type=int, help="flow runs at once from this process (default: no limit)")
    serve.add_argument("--monitor", action="append", default=[], metavar="MODEL",
                       help="also run the monitor flow on this registered model's production version on a schedule (repeat)")
    serve.add_argument("--monitor-every", metavar="WHEN", help="30s, 15m, 1h, 1d or a cron expression (default: the production "
                       "version's monitoring.every)")
    serve.add_argument("--endpoint", help="the monitored serving endpoint's API root (default: the version's monitoring.endpoint)")
    serve.add_argument("--endpoint-model", help="the model name the endpoint serves (default: monitoring.endpoint.model, else the "
                       "recipe's name, as the artifact's vLLM launch files serve it)")
    serve.add_argument("--traffic", help="request/response JSONL to monitor: path, glob or fsspec URL (default: monitoring.traffic)")
    serve.add_argument("--watch", action="append", default=[], metavar="RECIPE",
                       help="also run the release watcher for this recipe on a schedule (repeat): new bases are tuned and "
                       "a review opens when one beats production beyond noise")
    serve.add_argument("--watch-every", default="1d", metavar="WHEN", help="how often the watcher runs (default 1d)")
    serve.add_argument("--watch-base", dest="watch_bases", action="append", default=[], metavar="MODEL",
                       help="a candidate base (repeat; default: the recipe's compare.bases)")
    serve.set_defaults(handler=_serve)

    monitor = sub.add_parser("monitor", help="check a registered model's production outputs once: exit 0 ok, 1 breach, 2 bad input")
    monitor.add_argument("model", help="the registered model's name (its recipe's name)")
    monitor.add_argument("--endpoint", help="the serving endpoint's API root (default: the version's monitoring.endpoint)")
    monitor.add_argument("--endpoint-model", help="the model name the endpoint serves (default: monitoring.endpoint.model, else "
                         "the recipe's name)")
    monitor.add_argument("--traffic", help="request/response JSONL: path, glob or fsspec URL (default: monitoring.traffic)")
    monitor.add_argument("--output-dir", default="runs", help="folder that holds run folders and the registry (default: ./runs)")
    monitor.add_argument("--registry", help="the registry's folder or fsspec URL (default: <output-dir>/registry)")
    monitor.set_defaults(handler=_monitor)

    compare = sub.add_parser("compare", help="train the recipe on several base models and print the leaderboard, best first")
    _recipe_args(compare)
    compare.add_argument("--base", dest="bases", action="append", default=[], metavar="MODEL",
                         help="a base model to compare (repeat; default: the recipe's compare.bases); id@revision pins a revision")
    compare.add_argument("--output-dir", default="runs", help="folder that holds run folders and the registry (default: ./runs)")
    compare.add_argument("--force", action="store_true", help="run every stage again instead of reusing cached results")
    compare.add_argument("--api", dest="apis", action="append", default=[], metavar="NAME",
                         help="rank a contender (evaluation.contenders) beside the candidates: its quality on the same rows and its "
                         "price per 1,000 requests (repeat)")
    compare.set_defaults(handler=_compare)

    prepare = sub.add_parser("prepare", help="run the data stage alone, into the folder `ftpipe run` would use")
    _recipe_args(prepare)
    prepare.add_argument("--output-dir", default="runs", help="folder that holds run folders (default: ./runs)")
    prepare.add_argument("--force", action="store_true", help="prepare the data again instead of reusing the cached result")
    prepare.set_defaults(handler=_prepare)
    return parser


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, or the name of one in recipes/ (e.g. quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field, e.g. --set training.epochs=2 (repeatable)")


def _load(args) -> Recipe:
    return load_recipe(recipe_path(args.recipe), args.overrides)


def _validate(args) -> int:
    """Everything that can be known before a run without running model code: the schema, the files and folders the
    recipe names, the base model's config (read, never executed) against the LoRA settings, the chat template."""
    from recipes.preflight import recipe_problems, target_module_problems

    recipe = _load(args)
    problems = recipe_problems(recipe, args.output_dir)
    config = _model_config(recipe)
    if isinstance(config, str):
        print(f"note: {config}; the model-specific checks run when training starts", file=sys.stderr)
    else:
        from training.families import adapter_problems, family_for

        try:
            problems += adapter_problems(family_for(config.model_type), recipe.training.lora)
            problems += target_module_problems(recipe, config)
        except ValueError as exc:
            problems.append(f"model: {exc}")
    if problems:
        raise RecipeError(problems)
    for line in remote_code_lines(recipe):
        print(line, file=sys.stderr)
    print(summary(recipe))
    for line in _template_lines(recipe, config):
        print(line)
    from training.launch import launch_problems

    for problem in launch_problems(recipe.training.distributed):
        print(f"warning: on this machine, {problem}", file=sys.stderr)
    if args.gpu and not isinstance(config, str):
        for line in _fit_warnings(recipe, config, args.gpu):
            print(line, file=sys.stderr)
    return EXIT_OK


def _template_lines(recipe: Recipe, config) -> list[str]:
    """How the base model's chat template encodes rows (one-pass or per turn) and what it rewrites, said before any
    work: a local folder's own tokenizer and template, or for a tiny model its family's template."""
    import tempfile

    from jinja2 import TemplateError

    from recipes.schema import TINY_PREFIX
    from training.families import family_for
    from training.models import BaseModelRef, ModelLoadError, load_tokenizer
    from training.tiny import train_tokenizer
    from training.tokenize import MaskingError, describe_template

    tiny = recipe.model.base.startswith(TINY_PREFIX)
    if isinstance(config, str) or not (tiny or Path(recipe.model.base).is_dir()):
        return []
    with tempfile.TemporaryDirectory() as scratch:
        folder = recipe.model.base
        if tiny:
            train_tokenizer(family_for(config.model_type), ["Answer briefly. First question? First answer."]).save_pretrained(scratch)
            folder = scratch
        try:  # never the folder's own code here: validate reports what trust_remote_code would run (remote_code_lines)
            model = recipe.model.model_copy(update={"trust_remote_code": False})
            tokenizer = load_tokenizer(BaseModelRef(recipe.model.base, None, folder, config.model_type), model)
            return describe_template(tokenizer)
        except (ModelLoadError, MaskingError, TemplateError, ValueError) as exc:
            return [f"chat template: cannot render a probe conversation: {' '.join(str(exc).split())[:300]}"]


def _model_config(recipe: Recipe):
    """The base model's config without downloading anything (a tiny model's is known without building it),
    or why it is not available."""
    from recipes.schema import TINY_PREFIX

    if recipe.model.base.startswith(TINY_PREFIX):
        from recipes.schema import TINY_MODEL_TYPES
        from training.families import family_for
        from training.tiny import tiny_config

        return tiny_config(family_for(TINY_MODEL_TYPES[recipe.model.base[len(TINY_PREFIX):]]))
    from transformers import AutoConfig

    try:  # trust_remote_code=False whatever the recipe says: validating must not execute the model folder's code
        return AutoConfig.from_pretrained(recipe.model.base, revision=recipe.model.revision, local_files_only=True,
                                          trust_remote_code=False)
    except (OSError, ValueError) as exc:
        return f"the config of {recipe.model.base!r} is not available offline ({' '.join(str(exc).split())[:200]})"


def remote_code_lines(recipe: Recipe) -> list[str]:
    """What `model.trust_remote_code: true` would let a run import from a local base folder: the auto_map entries of
    its config and tokenizer config, and the Python files there; read as text, never run."""
    folder = Path(recipe.model.base)
    if not recipe.model.trust_remote_code or not folder.is_dir():
        return []
    entries = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / name).read_text()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        entries += [f"{key} -> {value}" for key, value in auto_map.items()]
    files = sorted(p.name for p in folder.glob("*.py"))
    if not entries and not files:
        return [f"note: model.trust_remote_code is true but {folder} holds no code (no auto_map, no .py files)"]
    return [f"warning: model.trust_remote_code: a run will import and execute code from {folder}: "
            f"{', '.join(entries) or 'no auto_map'}; files {', '.join(files) or 'none'}. validate did not run it."]


def _fit_warnings(recipe: Recipe, config, gpu: str) -> list[str]:
    from training.estimate import GPUS, estimate
    from training.families import family_for

    return estimate(config, family_for(config.model_type), recipe.training, GPUS[gpu], tokens_per_epoch=0, rows=0).warnings()


def _estimate(args) -> int:
    import logging
    from dataclasses import replace

    from transformers import AutoConfig

    from data_prep.prepare import prepare_data
    from flows.finetune import run_folder
    from flows.runlock import run_folder_lock
    from training.estimate import GPUS, estimate
    from training.train import filter_for_model, resolve_base_for

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # stage logs to the terminal, not to Prefect
    recipe = _load(args)
    gpu = GPUS[args.gpu] if args.usd_per_hour is None else replace(GPUS[args.gpu], usd_per_hour=args.usd_per_hour)
    with run_folder_lock(run_folder(recipe, args.output_dir), "ftpipe estimate"):
        data = prepare_data(recipe.data, run_folder(recipe, args.output_dir) / "data")
    base = resolve_base_for(recipe.model, data)
    data = filter_for_model(data, recipe.data, recipe.model, recipe.training, base)
    config = AutoConfig.from_pretrained(base.path, revision=base.revision, trust_remote_code=recipe.model.trust_remote_code)
    result = estimate(config, base.family, recipe.training, gpu, data.token_lengths["train_tokens"], data.train_rows, args.tokens_per_s)
    print(f"recipe: {recipe.name}, model {recipe.model.base}, {data.train_rows:,} training rows")
    print("\n".join(result.lines()))
    return EXIT_OK


def _estimate_rules() -> str:
    import ast

    source = (Path(__file__).resolve().parent.parent / "training" / "estimate.py").read_text()
    return ast.get_docstring(ast.parse(source)) or ""


def summary(recipe: Recipe) -> str:
    """One screen: what will run, on what, with which gates."""
    t, e, d = recipe.training, recipe.evaluation, recipe.data
    length = f"max_steps={t.max_steps}" if t.max_steps else f"epochs={t.epochs:g}"
    gates = ", ".join(f"{g.metric} no regression vs {g.no_regression_vs} (tolerance {g.tolerance:g})" if g.kind == "no_regression_vs"
                      else f"{g.metric} {g.kind}={g.threshold:g}" for g in e.gates) or "none"
    a = recipe.approval
    who = ", ".join(a.reviewers) or "the reviewers of the model's promotion policy"
    approval = f"required from {who} within {a.timeout_hours:g} h" if a.required else "not required (development recipe)"
    lines = [
        f"recipe: {recipe.name} (valid)",
        f"model: {recipe.model.base}" + (f" @ {recipe.model.revision}" if recipe.model.revision else ""),
        f"data: {len(d.sources)} source(s): " + ", ".join(s.name for s in d.sources),
        "eval: " + (", ".join(s.name for s in d.eval_sources) if d.eval_sources else f"{d.eval_fraction:g} split (seed {d.seed})")
        + f", max {e.max_samples} samples",
        "suites: " + "; ".join(f"{suite.name} ({', '.join(suite.metrics)})" for suite in e.suites),
        f"training: {t.method} {t.adapter} r={t.lora.r} alpha={t.lora.alpha} targets={t.lora.target_modules} backend={t.backend}",
        f"          {length} lr={t.learning_rate:g} batch={t.batch_size}x{t.gradient_accumulation_steps} "
        f"max_seq_length={t.max_seq_length} packing={t.packing} seed={t.seed}",
        *([f"          dpo beta={t.dpo.beta:g} loss={t.dpo.loss_type}"] if t.method == "dpo" else []),
        *([f"          distributed: {t.distributed.num_processes} processes, {t.distributed.strategy} (accelerate launch)"]
          if t.distributed.num_processes > 1 else []),
        f"gates: {gates}",
        f"export: dtype={recipe.export.dtype} merged={recipe.export.merged} adapter={recipe.export.adapter}",
        f"tracking: wandb {recipe.tracking.mode}",
        "registry: " + (f"{recipe.registry.uri or '<output-dir>/registry'} as {recipe.name}, compared with its production model: "
                        f"{'yes' if recipe.registry.compare_with_champion else 'no'}" if recipe.registry.enabled else "disabled"),
        f"approval: {approval}",
    ]
    return "\n".join(lines)


def _schema(args) -> int:
    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return EXIT_OK


def _run(args) -> int:
    _route_stage_logs()  # before Prefect is imported: it reads its logging settings then
    from flows.finetune import finetune

    return _run_flow(finetune, args, lambda path: _printed(f"artifact: {path}"), governed=True)


def _prepare(args) -> int:
    _route_stage_logs()
    from flows.finetune import prepare

    return _run_flow(prepare, args, lambda path: _printed(f"data: {path}"))


def _compare(args) -> int:
    _route_stage_logs()
    from flows.compare import compare_models, require_apis, require_bases

    require_bases(_load(args), args.bases)  # before Prefect starts: nothing to compare is an input error
    require_apis(_load(args), args.apis)
    return _run_flow(compare_models, args, _print_leaderboard, governed=_load(args).compare.promote_best, bases=args.bases or None,
                     apis=args.apis or None)


def _print_leaderboard(result: dict) -> int:
    from evaluation.leaderboard import leaderboard_lines

    print("\n".join(leaderboard_lines(result["leaderboard"])))
    if result["best"] is None:
        print("best: none (no candidate passed the gates; see the eligible column)")
        return EXIT_GATE
    print(f"best: {result['best']}")
    if result["artifact"]:
        print(f"artifact: {result['artifact']}")
    return EXIT_OK


def _printed(line: str) -> int:
    print(line)
    return EXIT_OK


def _run_flow(flow, args, on_result, governed: bool = False, **parameters) -> int:
    from training.launch import launch_problems

    from flows.finetune import governed as check_policy

    from recipes.preflight import recipe_problems

    recipe = _load(args)
    # before any work, not after the data stage
    if problems := launch_problems(recipe.training.distributed) + recipe_problems(recipe, args.output_dir):
        raise RecipeError(problems)
    if governed:  # a run that would weaken its model's policy is refused before Prefect starts
        check_policy(recipe, args.output_dir)
    _detect_crashes()
    state = flow(recipe, output_dir=args.output_dir, force=args.force, return_state=True, **parameters)
    if state.is_completed():
        return on_result(state.result())
    if recipe.approval.required and "never resumed" in (state.message or ""):
        # the server fails a run whose approval pause expired, replacing the run's own PromotionRefused
        print(f"error: not promoted: no decision within {recipe.approval.timeout_hours:g} h ({state.message})", file=sys.stderr)
        return EXIT_GATE
    error = state.result(raise_on_failure=False)
    code = exit_code_for(error)
    print(f"error: {error}" if isinstance(error, BaseException) else f"error: flow run ended {state.name}: {state.message}", file=sys.stderr)
    return code


def _detect_crashes() -> None:
    """On a running Prefect server (not the embedded one, which dies with this process), make sure a run killed
    here ends Crashed."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from flows.deployments import ensure_crash_detection

        ensure_crash_detection()


def _serve(args) -> int:
    _route_stage_logs()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("error: PREFECT_API_URL is not set: start a server (`prefect server start`) and run "
              "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` first", file=sys.stderr)
        return EXIT_INPUT
    if args.gpus < 1:
        raise RecipeError([f"--gpus: must be at least 1 (got {args.gpus})"])
    from flows.deployments import serve_deployments

    serve_deployments(args.output_dir, args.gpus, args.limit, _scheduled(args))
    return EXIT_OK


def _scheduled(args) -> list:
    """The monitor-<model> and watch-<recipe> deployments `ftpipe serve` runs on their schedules."""
    from flows.deployments import Scheduled
    from flows.monitor import production_version
    from recipes.schema import schedule_seconds
    from serving.registry import registry_for

    for option, when in (("--monitor-every", args.monitor_every), ("--watch-every", args.watch_every)):
        try:
            schedule_seconds(when) if when else None
        except ValueError as exc:
            raise RecipeError([f"{option}: {exc}"]) from None
    scheduled = []
    for model in args.monitor:
        every = args.monitor_every
        if every is None:
            every = production_version(registry_for(None, args.output_dir), model)[2].monitoring.every
        given = {"endpoint_url": args.endpoint, "endpoint_model": args.endpoint_model, "traffic": args.traffic}
        parameters = {"model": model, **{k: v for k, v in given.items() if v}}
        scheduled.append(Scheduled(f"monitor-{model}", "monitor", parameters, every))
    for name in args.watch:
        recipe = load_recipe(recipe_path(name))
        shipped = name in recipe_names()  # a shipped recipe by name; a file's recipe travels whole, as the form sends it
        scheduled.append(Scheduled(f"watch-{recipe.name}", "watch-releases",
                                   {"recipe": name if shipped else recipe.model_dump(mode="json"),
                                    **({"bases": args.watch_bases} if args.watch_bases else {})}, args.watch_every))
    return scheduled


def _monitor(args) -> int:
    """One monitoring run on the embedded (or configured) Prefect server."""
    _route_stage_logs()
    from flows.monitor import monitor

    state = monitor(args.model, output_dir=args.output_dir, registry=args.registry, endpoint_url=args.endpoint,
                    endpoint_model=args.endpoint_model, traffic=args.traffic, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        print(f"error: {error}", file=sys.stderr)
        return exit_code_for(error)
    result = state.result()
    rollback = result["rollback"]
    print(f"{result['model']} version {result['version']}: {result['status']} (audit entry {result['audit_entry']}; report {result['report']})")
    for breach in result["breaches"]:
        print(f"BREACH {breach}")
    if rollback.get("to"):
        print(f"production rolled back to version {rollback['to']}")
    elif rollback.get("refused"):
        print(f"production stays: {rollback['refused']}")
    return EXIT_GATE if result["breaches"] else EXIT_OK


def _check_artifact(args) -> int:
    from serving.checks import check_artifact
    from serving.vllm_env import VllmEnvError, check_with_vllm, vllm_python

    root = Path(args.path)
    problems = check_artifact(root)
    checked = "files and checksums, config, weights, tokenizer, chat template, stop tokens, adapter, launch files"
    python = vllm_python(args.vllm_python)
    if python and (root / "model").is_dir():
        rows = None
        if args.rows:
            from data_prep.prepare import read_jsonl

            rows = [row for row in read_jsonl(args.rows) if "messages" in row]
        try:
            verdicts = check_with_vllm(root, python, rows)
        except VllmEnvError as exc:
            raise RecipeError([f"--vllm-python: {exc}"]) from None
        problems += [f"vllm: {v['check']}: {v['detail']}" for v in verdicts if not v["ok"]]
        skipped = [v for v in verdicts if v.get("skipped")]
        for verdict in skipped:
            print(f"NOT CHECKED vllm: {verdict['check']}: {verdict['detail']}")
        checked += f"; vLLM's own code: {len(verdicts) - len(skipped)} checks" + (f", {len(skipped)} left to a GPU machine" if skipped else "")
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{root}: " + (f"{len(problems)} problem(s)" if problems else f"PASS ({checked})"))
    return EXIT_GATE if problems else EXIT_OK


def _tool_env_parser(sub, name: str, what: str, folder: str, default_torch: str, handler) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=f"make a virtual environment with {what}")
    parser.add_argument("path", help=f"the environment's folder, e.g. {folder}")
    parser.add_argument("--torch", help=f"the torch version to install (default: {default_torch})")
    parser.set_defaults(handler=handler)
    return parser


def _vllm_env(args) -> int:
    from serving.vllm_env import VLLM_PYTHON_ENV, create_env

    return _tool_env(lambda: create_env(Path(args.path), args.torch, args.full),
                     lambda python: f"vLLM environment ready: check artifacts with `ftpipe check-artifact PATH --vllm-python {python}` "
                                    f"(or export {VLLM_PYTHON_ENV}={python})")


def _quantize_env(args) -> int:
    from serving.quantize import QUANTIZE_PYTHON_ENV, create_quantize_env

    return _tool_env(lambda: create_quantize_env(Path(args.path), args.torch),
                     lambda python: f"llm-compressor environment ready: export {QUANTIZE_PYTHON_ENV}={python} for export.quantize")


def _tool_env(create, ready) -> int:
    """Make a tool's own environment; its Python, or the error in one line."""
    from serving.vllm_env import ToolEnvError

    try:
        python = create()
    except ToolEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(ready(python))
    return EXIT_OK


def _smoke(args) -> int:
    from data_prep.readers import DataError
    from serving.smoke import smoke, suite_conversations

    try:
        conversations = suite_conversations(args.suite, args.limit)
    except (DataError, RecipeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    report = smoke(args.base_url, args.model, conversations, max_tokens=args.max_tokens, api_key=args.api_key)
    print("\n".join(report.lines()))
    if args.report:
        from data_prep.files import atomic_write_json

        atomic_write_json(Path(args.report), report.to_dict())
    failed = report.failed or (args.min_exact_match is not None and report.exact_match < args.min_exact_match)
    if report.failed:
        first = next(e["error"] for e in report.examples if e["error"])
        print(f"error: {report.failed} of {report.requests} requests failed; first: {first}", file=sys.stderr)
    elif failed:
        print(f"error: exact match {report.exact_match:.4f} is below --min-exact-match {args.min_exact_match:g}", file=sys.stderr)
    return EXIT_GATE if failed else EXIT_OK


def _route_stage_logs() -> None:
    """Stages log with `logging`; Prefect shows and stores those loggers' INFO lines in the flow run."""
    import logging

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", STAGE_LOGGERS)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded server's 20 s default is too short on a busy 2-core machine (seen while tests ran beside it)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # heartbeats every 30 s (Prefect's default is 180) so a killed run is Crashed within 90 s (flows/deployments.py)
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    for name in STAGE_LOGGERS.split(","):
        logging.getLogger(name).setLevel(logging.INFO)


def entrypoint() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `ftpipe registry list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    entrypoint()
