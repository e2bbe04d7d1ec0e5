"""What a recipe needs from this machine, checked before any work (`ftpipe validate`, `ftpipe run`, the flow's start):
the files it names exist and parse, the folders it writes to are writable, its chat template compiles and its LoRA
target modules exist in the base model. Each problem is one `field.path: message` line; nothing here runs model code.
"""
from __future__ import annotations

from pathlib import Path

from recipes.loader import URL
from recipes.schema import TINY_PREFIX, Recipe


def recipe_problems(recipe: Recipe, output_dir: str | Path | None = None) -> list[str]:
    """Every problem found, in recipe order (empty: the recipe can start here)."""
    problems = [*_source_problems("data.sources", recipe.data.sources), *_source_problems("data.eval_sources", recipe.data.eval_sources),
                *_template_problems(recipe), *_evaluation_problems(recipe), *_cost_problems(recipe), *_export_problems(recipe)]
    if output_dir is not None:
        problems += _writable("--output-dir", str(output_dir))
    if recipe.registry.enabled:
        registry = recipe.registry.uri or (str(Path(output_dir) / "registry") if output_dir is not None else None)
        problems += _writable("registry.uri", registry) if registry else []
    return problems


def _source_problems(field: str, sources) -> list[str]:
    """Local data sources whose files are missing (URLs and hub datasets are read when the data stage runs)."""
    from data_prep.readers import DataError
    from data_prep.sources import files_behind

    problems = []
    for i, source in enumerate(sources):
        if source.path is None or URL.match(source.path):
            continue
        try:
            files_behind(source.path)
        except DataError as exc:
            problems.append(f"{field}[{i}].path: {exc}")
    return problems


def _template_problems(recipe: Recipe) -> list[str]:
    """A chat template override that is missing or does not compile, compiled as transformers compiles it for
    apply_chat_template (its sandbox, `{% generation %}` and loop controls); compiling runs nothing."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from training.models import ModelLoadError, chat_template_override

    try:
        template = chat_template_override(recipe.model)
    except (ModelLoadError, UnicodeDecodeError) as exc:
        return [str(exc) if isinstance(exc, ModelLoadError) else f"model.chat_template: not UTF-8 text ({exc.reason})"]
    if not template:
        return []
    try:
        _compile_jinja_template(template)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        return [f"model.chat_template: not a valid Jinja template{line}: {exc.message or exc}"]
    return []


def _evaluation_problems(recipe: Recipe) -> list[str]:
    evaluation = recipe.evaluation
    problems = []
    for i, path in enumerate(evaluation.safety.red_team_files):
        if not URL.match(path) and not Path(path).is_file():
            problems.append(f"evaluation.safety.red_team_files[{i}]: file not found: {path}")
    if evaluation.lm_eval.include_path and not Path(evaluation.lm_eval.include_path).is_dir():
        problems.append(f"evaluation.lm_eval.include_path: folder not found: {evaluation.lm_eval.include_path}")
    for i, suite in enumerate(evaluation.suites):
        if suite.json_schema is not None:
            try:
                suite.check_json_schema()
            except ValueError as exc:
                problems.append(f"evaluation.suites[{i}].json_schema: {exc}")
        problems += _source_problems(f"evaluation.suites[{i}].sources", suite.sources)
    return problems


def _cost_problems(recipe: Recipe) -> list[str]:
    from evaluation.costs import CostError, load_prices

    if recipe.cost.price_file is None:
        return []
    try:
        load_prices(recipe.cost)
    except CostError as exc:
        return [str(exc)]
    return []


def _export_problems(recipe: Recipe) -> list[str]:
    from serving.quantize import quantize_env_problems

    return quantize_env_problems(recipe.export.quantize)


def _writable(field: str, location: str) -> list[str]:
    """A local folder that exists and can be written, or can be made where its nearest existing parent is writable.
    Tried with a file made and removed there: permission bits say nothing to root or on a read-only mount."""
    import tempfile

    if URL.match(location):
        return []  # object stores are checked by their first write; their credentials may live elsewhere
    path = Path(location).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"{field}: {existing} is a file, not a folder (for {location})"]
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ftpipe-write-check-"):
            pass
    except OSError as exc:
        return [f"{field}: cannot write in {existing} ({exc.strerror or exc}), so {location} cannot be written"]
    return []


def target_module_problems(recipe: Recipe, config) -> list[str]:
    """Explicit lora.target_modules that match no module of the base model, by peft's rule (the module's name or its
    last parts); the model is built on the meta device from its config, which allocates nothing and runs no hub code."""
    names = recipe.training.lora.target_modules
    if not isinstance(names, list) or isinstance(config, str):
        return []
    modules = _module_names(config)
    suffixes = {".".join(parts[i:]) for name in modules for parts in [name.split(".")] for i in range(len(parts))}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules if name})
    return [f"training.lora.target_modules[{i}]: {name!r} is no module of {config.model_type} "
            f"({'tiny model' if recipe.model.base.startswith(TINY_PREFIX) else recipe.model.base}); its linear layers are named "
            f"{', '.join(n for n in leaves if n.endswith('proj') or n in ('lm_head', 'embed_tokens')) or ', '.join(leaves[:20])}"
            for i, name in enumerate(names) if name not in suffixes]


def _module_names(config) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return [name for name, _ in model.named_modules()]
