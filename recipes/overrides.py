"""The JSON schema of a flow's `overrides` parameter, derived from the recipe schema: every key a run may override
(a section, a dotted path, a list item by index) with its own type, range and choices, and nothing else. Prefect
checks parameters against it when a deployment enforces its schema, so a misspelt path or an out-of-range value is
refused when the run is submitted (HTTP 409, the form's Validate), not a minute later inside the run."""
from __future__ import annotations

import re
from typing import Any

from recipes.schema import Recipe

NOTES = ("title", "description", "default", "examples")  # what a value's schema says to a person, not to a validator


def override_patterns() -> dict[str, dict[str, Any]]:
    """Anchored regex of each overridable key -> the schema its value must meet (sections by reference)."""
    schema = Recipe.model_json_schema()
    defs = schema.pop("$defs", {})
    patterns: dict[str, dict[str, Any]] = {}
    _add_fields(schema, defs, "", patterns)
    return {f"^{pattern}$": _inlined(value, defs) for pattern, value in patterns.items()}


def overrides_json_schema() -> dict[str, Any]:
    """`overrides`: null or an object whose keys are recipe paths (`training.lora.r`, `data.sources.0.path`) or
    sections given in part (`{"training": {"epochs": 2}}`)."""
    patterns = override_patterns()
    # propertyNames (not additionalProperties: false) so that a wrong key's error names the key, not 200 patterns
    # null or an object, with the key and value rules beside that choice (not inside an anyOf branch), so an error
    # names the offending key or value instead of "not valid under any of the given schemas"
    return {"anyOf": [{"type": "object"}, {"type": "null"}],
            "propertyNames": {"anyOf": [{"pattern": pattern} for pattern in patterns]}, "patternProperties": patterns}


def _add_fields(model: dict, defs: dict, prefix: str, patterns: dict) -> None:
    for name, field in model.get("properties", {}).items():
        key = prefix + re.escape(name)
        patterns[key] = field
        if (section := _model(field, defs)) is not None:
            _add_fields(section, defs, key + r"\.", patterns)
        if (items := _list_items(field)) is not None:
            patterns[key + r"\.\d+"] = items
            if (item_model := _model(items, defs)) is not None:
                _add_fields(item_model, defs, key + r"\.\d+\.", patterns)
        if (values := _mapping_values(field)) is not None:
            patterns[key + r"\.[^.]+"] = values


def _options(field: dict) -> list[dict]:
    return [field, *field.get("anyOf", []), *field.get("allOf", [])]


def _model(field: dict, defs: dict) -> dict | None:
    """The model a field holds (directly, optional or wrapped), if any."""
    for option in _options(field):
        if (ref := option.get("$ref")) and "properties" in (target := defs[ref.rsplit("/", 1)[1]]):
            return target
    return None


def _list_items(field: dict) -> dict | None:
    for option in _options(field):
        if option.get("type") == "array" and isinstance(option.get("items"), dict):
            return option["items"]
    return None


def _mapping_values(field: dict) -> dict | None:
    """A free-form mapping's value schema (`model.chat_template_kwargs.enable_thinking`)."""
    for option in _options(field):
        if option.get("type") == "object" and isinstance(option.get("additionalProperties"), dict):
            return option["additionalProperties"]
    return None


def _inlined(value: Any, defs: dict, notes: bool = True) -> Any:
    """The schema with each model it references written in place (Prefect checks each parameter's schema on its
    own, where references to shared definitions do not resolve); the models without their notes, to keep it small."""
    if isinstance(value, list):
        return [_inlined(item, defs, notes) for item in value]
    if not isinstance(value, dict):
        return value
    if "$ref" in value:
        return _inlined(defs[value["$ref"].rsplit("/", 1)[1]], defs, notes=False)
    inlined = {}
    for key, item in value.items():
        if key in ("properties", "patternProperties"):  # names -> schemas: a field may be called "description"
            inlined[key] = {name: _inlined(schema, defs, notes) for name, schema in item.items()}
        elif notes or key not in NOTES:
            inlined[key] = _inlined(item, defs, notes)
    return inlined
