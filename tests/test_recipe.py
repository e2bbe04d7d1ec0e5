"""The recipe schema, loader, overrides and their error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import Recipe, RecipeError, load_recipe, recipe_hash, resolve_recipe
from recipes.loader import recipe_from_dict
from tests.conftest import ROOT, run_ftpipe

RECIPE_FILES = sorted((ROOT / "recipes").glob("*.yaml"))


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    return info.value.lines


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_its_data_exists(path):
    recipe = load_recipe(path)
    for source in recipe.data.sources + recipe.data.eval_sources:
        assert Path(source.path).is_file(), source.path


def test_defaults_alone_make_a_valid_recipe():
    with pytest.raises(ValueError, match="approval.required: approval decides promotion in the registry"):
        Recipe(approval={"required": True}, registry={"enabled": False})  # reviewers and their credentials live there
    assert Recipe(approval={"required": True}).approval.reviewers == []  # who decides is the registry's policy
    recipe = Recipe()
    assert recipe.model.base == "tiny:llama"
    assert Path(recipe.data.sources[0].path).is_file()
    assert recipe.training.adapter == "lora" and recipe.training.backend == "auto"


def test_quickstart_gates_as_the_issue_asks():
    gates = load_recipe(ROOT / "recipes" / "quickstart.yaml").evaluation.gates
    assert [(g.metric, g.kind, g.reference, g.threshold) for g in gates] == [
        ("exact_match", "min", None, 0.9), ("exact_match", "min_delta_vs_base", "base", 0.5),
        ("safety.refusal_rate", "no_regression_vs", "base", -0.02), ("exact_match", "no_regression_vs", "champion", -0.02)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"training": {"lora": {"rank": 8}}}, "training.lora.rank: unknown key; did you mean 'r'?"),
        ({"training": {"lerning_rate": 0.1}}, "training.lerning_rate: unknown key; did you mean 'learning_rate'?"),
        ({"modle": {}}, "modle: unknown key; did you mean 'model'?"),
        ({"data": {"sources": [{"path": "x.jsonl", "fromat": "chat"}]}}, "data.sources.0.fromat: unknown key; did you mean 'format'?"),
        ({"zzz": 1}, "zzz: unknown key"),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(raw, expected):
    assert errors_of(raw) == [expected]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"training": {"lora": {"r": 0}}}, "training.lora.r: Input should be greater than 0 (got 0)"),
        ({"training": {"adapter": "dora"}}, "training.adapter: Input should be 'lora' or 'qlora' (got 'dora')"),
        ({"model": {"base": "tiny:gpt2"}}, "model: unknown tiny model 'tiny:gpt2'; use one of tiny:llama, tiny:mistral, tiny:mixtral, tiny:qwen2, tiny:qwen3, tiny:llama4, tiny:deepseek_v3, tiny:qwen3_moe"),
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction: Input should be less than 1 (got 1.5)"),
        ({"name": "My Run"}, "name: String should match pattern '^[a-z0-9][a-z0-9._-]{0,63}$' (got 'My Run')"),
        ({"evaluation": {"gates": [{"metric": "bleu", "min": 1}]}}, "evaluation.gates.0: unknown metric 'bleu'; use one of: exact_match, normalized_exact_match, token_f1, rouge_l, json_valid, "
         "json_schema, json_field_accuracy, regex_match, label_accuracy, label_macro_f1, eval_loss, perplexity, preference_accuracy, preference_margin, judge_score, "
         "safety.refusal_rate, safety.injection_resistance, safety.pii_leak_rate, safety.bias_change_rate"),
        ({"evaluation": {"gates": [{"metric": "exact_match", "min": 0.9, "max": 1}]}},
         "evaluation.gates.0: a gate needs exactly one of min, max, min_delta_vs_base, max_delta_vs_base, min_delta_vs_champion, max_delta_vs_champion, "
             "min_delta_vs_unquantized, max_delta_vs_unquantized, no_regression_vs (got min, max)"),
        ({"export": {"merged": False, "adapter": False}}, "export: merged and adapter are both false: nothing would be exported"),
        ({"data": {"sources": [{"hub": "acme/x", "path": "x.jsonl"}]}}, "data.sources.0: a source needs exactly one of path or hub"),
        ({"data": {"sources": [{"path": "x.jsonl", "weight": 0}]}}, "data.sources.0.weight: Input should be greater than 0 (got 0)"),
        ({"data": {"pii": {"types": ["email", "ssn"]}}},
         "data.pii.types.1: Input should be 'email', 'phone', 'credit_card', 'iban', 'ip_address' or 'secret' (got 'ssn')"),
    ],
)
def test_bad_values_name_the_field_and_the_problem(raw, expected):
    assert errors_of(raw) == [expected]


def test_every_error_is_reported_at_once():
    lines = errors_of({"training": {"epochs": 0, "batch_size": -1}})
    assert lines == ["training.epochs: Input should be greater than 0 (got 0)", "training.batch_size: Input should be greater than 0 (got -1)"]


def test_overrides_set_nested_fields_lists_and_yaml_values(tmp_path):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        ["training.lora.r=8", "training.lora.target_modules=[q_proj, v_proj]", "evaluation.gates.0.min=0.5", "model.revision=abc123"],
    )
    assert recipe.training.lora.r == 8
    assert recipe.training.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.evaluation.gates[0].min == 0.5
    assert recipe.model.revision == "abc123"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.epochs", "--set training.epochs: expected path=value, e.g. training.epochs=2"),
        ("evaluation.gates.5.min=1", "evaluation.gates.5: list index '5' out of range (the list has 4 items)"),
        ("training.lora.r=abc", "training.lora.r: Input should be a valid integer, unable to parse string as an integer (got 'abc')"),
    ],
)
def test_bad_overrides(override, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [override])
    assert info.value.lines == [expected]


def test_relative_data_paths_are_read_from_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    recipe_path = tmp_path / "sub" / "r.yaml"
    recipe_path.write_text("data:\n  sources:\n    - path: ../rows.jsonl\n")
    assert load_recipe(recipe_path).data.sources[0].path == str(tmp_path / "rows.jsonl")


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.lines[0].startswith(f"{path}: not valid YAML: could not determine a constructor for the tag")


@pytest.mark.parametrize(
    ("content", "expected"),
    [("- a\n- b\n", "a recipe must be a mapping of sections, got list"), ("name: [unclosed\n", "not valid YAML")],
)
def test_malformed_recipe_files(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.lines[0].startswith(f"{path}: {expected}")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert info.value.lines == [f"{tmp_path / 'nope.yaml'}: recipe file not found; shipped recipes: dpo, quickstart (give one by name, "
                                "or a path to a recipe file)"]


def test_recipe_hash_is_stable_and_sensitive():
    a = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    b = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    c = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["training.seed=7"])
    assert recipe_hash(a) == recipe_hash(b) != recipe_hash(c)


def test_cli_validate_prints_a_summary():
    result = run_ftpipe("validate", "recipes/quickstart.yaml", "--set", "training.lora.r=8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "recipe: quickstart (valid)"
    assert "training: sft lora r=8 alpha=32 targets=all-linear backend=auto" in lines
    assert len(lines) <= 24


def test_cli_validate_names_hub_sources():
    result = run_ftpipe("validate", "quickstart", "--set", "data.sources=[{hub: acme/tickets, revision: v1}]")
    assert result.returncode == 0, result.stderr
    assert "data: 1 source(s): hub:acme/tickets" in result.stdout.splitlines()


def test_cli_validate_reports_each_error_and_exits_2():
    result = run_ftpipe("validate", "quickstart", "--set", "training.lora.rank=3", "--set", "training.epochs=-1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "training.lora.rank: unknown key; did you mean 'r'?",
        "training.epochs: Input should be greater than 0 (got -1)",
    ]


def test_cli_schema_is_the_recipe_json_schema():
    result = run_ftpipe("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema == Recipe.model_json_schema()
    assert schema["$defs"]["LoraSection"]["properties"]["r"]["description"].startswith("LoRA rank")
    assert schema["$defs"]["TrainingSection"]["additionalProperties"] is False


def test_the_summary_says_who_must_approve_and_how_gates_compare():
    from flows.cli import summary

    quickstart = ROOT / "recipes" / "quickstart.yaml"
    assert "approval: not required (development recipe)" in summary(load_recipe(quickstart))
    required = summary(load_recipe(quickstart, ["approval.required=true", "approval.reviewers=[alice, bob]", "approval.timeout_hours=24"]))
    assert "approval: required from alice, bob within 24 h" in required
    policy = summary(load_recipe(quickstart, ["approval.required=true"]))
    assert "approval: required from the reviewers of the model's promotion policy within 72 h" in policy
    assert "safety.refusal_rate no regression vs base (tolerance 0.02)" in required


def test_a_flow_run_takes_a_recipe_by_name_path_or_object_with_dict_overrides():
    """What the Prefect form and the REST API send: a name in recipes/ or a whole recipe object, plus overrides as
    nested sections or dotted paths."""
    by_name = resolve_recipe("quickstart", {"training": {"epochs": 2, "lora": {"r": 4}}, "evaluation.max_samples": 8})
    assert (by_name.training.epochs, by_name.training.lora.r, by_name.evaluation.max_samples) == (2, 4, 8)
    assert by_name.training.learning_rate == load_recipe(ROOT / "recipes" / "quickstart.yaml").training.learning_rate  # merged, not replaced
    inline = resolve_recipe(by_name.model_dump(mode="json"), {"data.sources.0.path": "other.jsonl"})
    assert inline.data.sources[0].path == "other.jsonl" and inline.training.lora.r == 4
    assert resolve_recipe(by_name) is by_name
    assert resolve_recipe(str(ROOT / "recipes" / "quickstart.yaml")).name == "quickstart"


@pytest.mark.parametrize(("recipe", "overrides", "expected"), [
    ("quickstart", {"training": {"lora": {"r": 0}}}, ["training.lora.r: Input should be greater than 0 (got 0)"]),
    ("quickstart", {"trainig.epochs": 2}, ["trainig: unknown key; did you mean 'training'?"]),
    ("quickstart", {"training.lora.target_modules.9": "x"}, ["training.lora.target_modules.9: list index '9' out of range (the list has 0 items)"]),  # quickstart leaves target_modules to the family
    ("quickstrat", None, ["quickstrat: recipe file not found; did you mean 'quickstart'? shipped recipes: dpo, quickstart (give one "
                          "by name, or a path to a recipe file)"]),
    (42, None, ["recipe: expected a recipe name (dpo, quickstart), a file path or a mapping, got int"]),
])
def test_a_bad_flow_parameter_is_refused_with_the_recipes_own_lines(recipe, overrides, expected):
    with pytest.raises(RecipeError) as caught:
        resolve_recipe(recipe, overrides)
    assert caught.value.lines == expected
