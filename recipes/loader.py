"""Load a recipe from YAML plus `--set path=value` overrides, with errors that name the field and the fix."""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from recipes.schema import Recipe


class RecipeError(ValueError):
    """An invalid recipe: one line per problem, each `field.path: message`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


Overrides = list[str] | dict[str, Any]


def load_recipe(path: str | Path | None = None, overrides: Overrides | None = None) -> Recipe:
    """Read a recipe file (or the defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        _resolve_relative_paths(raw, Path(path).resolve().parent)
    return recipe_from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: Overrides | None) -> dict[str, Any]:
    """`--set` strings (`training.epochs=2`), or a dict from the API: nested sections are merged into the recipe
    (`{"training": {"epochs": 2}}`) and dotted keys set one field (`{"training.lora.r": 8}`)."""
    if isinstance(overrides, dict):
        _merge(raw, overrides, prefix="")
        return raw
    for override in overrides or []:
        _apply_override(raw, override)
    return raw


def _merge(raw: dict[str, Any], partial: dict[str, Any], prefix: str) -> None:
    for key, value in partial.items():
        where = f"{prefix}{key}"
        if not isinstance(key, str) or not key.strip("."):
            raise RecipeError([f"overrides: {where!r}: empty field path"])
        if "." in key:
            _set_path(raw, key.split("."), value, where)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value, prefix=f"{where}.")
        else:
            raw[key] = value


RECIPES_DIR = Path(__file__).resolve().parent


def recipe_names() -> list[str]:
    """The recipes shipped in recipes/, by name (`quickstart` for recipes/quickstart.yaml)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _shipped_recipes_hint(path: Path) -> str:
    """What the user could have meant: the shipped recipes by name (the closest first), or a file path."""
    names = recipe_names()
    close = difflib.get_close_matches(path.stem, names, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}shipped recipes: {', '.join(names)} (give one by name, or a path to a recipe file)"


def recipe_path(name_or_path: str) -> Path:
    """A file path as given, or the name of a recipe in recipes/."""
    path = Path(name_or_path)
    if not path.exists() and (RECIPES_DIR / f"{name_or_path}.yaml").is_file():
        return RECIPES_DIR / f"{name_or_path}.yaml"
    return path


def resolve_recipe(recipe: "str | Enum | dict[str, Any] | Recipe", overrides: Overrides | None = None) -> Recipe:
    """The recipe a flow run was given: a name in recipes/, a file path, an inline mapping (API, UI form) or a Recipe;
    overrides applied, then validated with the loader's field-path errors."""
    if isinstance(recipe, Enum):
        recipe = recipe.value
    if isinstance(recipe, str):
        return load_recipe(recipe_path(recipe), overrides)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        recipe = recipe.model_dump(mode="json")
    if not isinstance(recipe, dict):
        raise RecipeError([f"recipe: expected a recipe name ({', '.join(recipe_names())}), a file path or a mapping, "
                           f"got {type(recipe).__name__}"])
    return recipe_from_dict(apply_overrides(copy.deepcopy(recipe), overrides))


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Validate a (partial) recipe dict, turning pydantic's errors into field-path lines."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([_error_line(err) for err in exc.errors()]) from None


def recipe_hash(recipe: Recipe) -> str:
    """A stable hash of the fully resolved recipe (defaults included)."""
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


MAX_RECIPE_BYTES = 256 * 1024  # a recipe is a page of settings; a bigger file is a mistake or an attack
MAX_YAML_DEPTH = 32  # mappings and lists nested inside each other
MAX_YAML_NODES = 50_000  # values once every alias is expanded (a "billion laughs" file is a few lines that expand to 10^9)


class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """yaml's safe loader, refusing a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
                seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: the constructor reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given on line {first})",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str):
    """YAML text as Python values, with limits a hostile file cannot get past: nesting depth, and size once aliases
    are expanded (checked on the events and the node graph, before anything is built); duplicate keys refused."""
    depth = 0
    for event in yaml.parse(text, Loader=_RecipeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RecipeError([f"{where}: nested more than {MAX_YAML_DEPTH} levels deep (line {event.start_mark.line + 1})"])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if (expanded := _expanded_size(node, {}, set(), where)) > MAX_YAML_NODES:
            raise RecipeError([f"{where}: {expanded:,} values once its aliases are expanded, above the limit of {MAX_YAML_NODES:,}"])
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict, open_nodes: set, where: str) -> int:
    """Values a node stands for with every alias expanded (each shared node counted once per use, computed once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise RecipeError([f"{where}: line {node.start_mark.line + 1}: an alias refers to a value that contains it"])
    open_nodes.add(id(node))
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes, where)
        if size > MAX_YAML_NODES:
            break
    open_nodes.discard(id(node))
    sizes[id(node)] = size
    return size


def read_yaml_file(path: Path, what: str = "recipe"):
    """A YAML file's values under parse_yaml's limits and a size limit; a bad file is a RecipeError naming it (a file
    that cannot be opened raises the OSError)."""
    if (size := path.stat().st_size) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{path}: {size:,} bytes, above the {MAX_RECIPE_BYTES:,} a {what} may have"])
    try:
        return parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}: not valid YAML: {' '.join(str(exc).split())}"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found; {_shipped_recipes_hint(path)}"])
    data = read_yaml_file(path)
    if data is None:
        raise RecipeError([f"{path}: the recipe is empty (no settings, only blank lines or comments); write at least its name, "
                           "e.g. name: my-model, or run the default with `ftpipe run quickstart`"])
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}"])
    return data


def _resolve_relative_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Data paths and template files written in a recipe are relative to the recipe's own folder."""
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("sources", "eval_sources"):
            for source in data.get(key) or []:
                if isinstance(source, dict) and isinstance(source.get("path"), str):
                    source["path"] = _anchor(source["path"], base_dir)
    evaluation = raw.get("evaluation")
    harness = evaluation.get("lm_eval") if isinstance(evaluation, dict) else None
    if isinstance(harness, dict) and isinstance(harness.get("include_path"), str):
        harness["include_path"] = _anchor(harness["include_path"], base_dir)
    safety = evaluation.get("safety") if isinstance(evaluation, dict) else None
    if isinstance(safety, dict) and isinstance(safety.get("red_team_files"), list):
        safety["red_team_files"] = [_anchor(f, base_dir) if isinstance(f, str) else f for f in safety["red_team_files"]]
    for suite in (evaluation.get("suites") or []) if isinstance(evaluation, dict) else []:
        if not isinstance(suite, dict):
            continue
        for source in suite.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = _anchor(source["path"], base_dir)
        if isinstance(suite.get("json_schema"), str):
            suite["json_schema"] = _anchor(suite["json_schema"], base_dir)
    cost = raw.get("cost")
    if isinstance(cost, dict) and isinstance(cost.get("price_file"), str):
        cost["price_file"] = _anchor(cost["price_file"], base_dir)
    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("base", "chat_template"):
            value = model.get(key)
            if isinstance(value, str) and (value.startswith((".", "/")) or value.endswith(".jinja")) and "\n" not in value:
                model[key] = _anchor(value, base_dir)


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _anchor(value: str, base_dir: Path) -> str:
    """A relative path made absolute from the recipe's folder; URLs (https://, s3://, ...) stay as written."""
    if URL.match(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """`training.lora.r=8` sets raw['training']['lora']['r'] = 8; values are parsed as YAML scalars/lists."""
    if "=" not in override:
        raise RecipeError([f"--set {override}: expected path=value, e.g. training.epochs=2"])
    dotted, _, text = override.partition("=")
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise RecipeError([f"--set {override}: empty field path"])
    try:
        value = parse_yaml(text, f"--set {dotted}") if text.strip() else None
    except yaml.YAMLError:
        value = text
    _set_path(raw, keys, value, dotted)


def _set_path(raw: dict[str, Any], keys: list[str], value: Any, dotted: str) -> None:
    keys = [k for k in keys if k]
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        node = _child(node, key, default=[] if nxt.isdigit() else {}, where=".".join(keys[: i + 1]))
    _set(node, keys[-1], value, where=dotted)


def _child(node: Any, key: str, default: Any, where: str) -> Any:
    if isinstance(node, list):
        index = _index(key, node, where)
        return node[index]
    if not isinstance(node, dict):
        raise RecipeError([f"{where}: cannot set a field inside a {type(node).__name__}"])
    if not isinstance(node.get(key), (dict, list)):
        node[key] = default
    return node[key]


def _set(node: Any, key: str, value: Any, where: str) -> None:
    if isinstance(node, list):
        index = int(key) if key.isdigit() else -1
        if index == len(node):
            node.append(value)
            return
        node[_index(key, node, where)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise RecipeError([f"{where}: cannot set a field inside a {type(node).__name__}"])


def _index(key: str, node: list, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError([f"{where}: list index {key!r} out of range (the list has {len(node)} items)"])
    return int(key)


def _error_line(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"]]
    path = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        suggestion = _closest_field(err["loc"])
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return f"{path}: unknown key{hint}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "model_type") and "input" in err and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return f"{path}: {message}"


# Names other fine-tuning tools use for our fields; suggested when the field exists where the key was found.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "lr": "learning_rate", "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "sequence_len": "max_seq_length", "max_length": "max_seq_length",
    "base_model": "base", "model_name": "base", "model_id": "base",
}


def _closest_field(loc: tuple) -> str | None:
    """Walk the schema along loc to the model owning the unknown key and suggest its closest field."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _model_of(field.annotation) if field else None
    if model is None:
        return None
    key = str(loc[-1])
    if ALIASES.get(key) in model.model_fields:
        return ALIASES[key]
    matches = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None
