"""Recipes built to get past validation or to hurt the machine that validates them: each is refused at `validate`
(exit 2, the field named) in well under a second, and validating never runs the model folder's code."""
from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from recipes.loader import MAX_RECIPE_BYTES, RecipeError, load_recipe, recipe_from_dict
from recipes.preflight import recipe_problems, target_module_problems
from tests.conftest import run_ftpipe


def _refused(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.lines


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"sources": [{"path": "x.jsonl", "weight": float("inf")}]}}, "data.sources.0.weight: Input should be a finite number"),
        ({"data": {"sources": [{"path": "x.jsonl", "weight": 1e9}]}}, "data.sources.0.weight: Input should be less than or equal to 1000"),
        ({"training": {"epochs": float("inf")}}, "training.epochs: Input should be a finite number"),
        ({"training": {"lora": {"r": True}}}, "training.lora.r: expected a number, got a boolean"),
        ({"training": {"learning_rate": False}}, "training.learning_rate: expected a number, got a boolean"),
        ({"training": {"lora": {"target_modules": []}}}, "training.lora.target_modules: an empty list adapts nothing"),
        ({"training": {"lora": {"target_modules": ["q_proj", ""]}}}, "training.lora.target_modules: item 1 is not a module name"),
        ({"training": {"lora": {"target_modules": "everything"}}}, "training.lora.target_modules: 'everything' is not a preset"),
        ({"export": {"max_shard_size": "banana"}}, "export.max_shard_size: 'banana' is not a size"),
        ({"export": {"max_shard_size": "0GB"}}, "export.max_shard_size: '0GB': a size must be at least 1 byte"),
        ({"evaluation": {"gates": [{"metric": "exact_match", "min": float("nan")}]}}, "evaluation.gates.0.min: Input should be a finite number"),
        ({"cost": {"prices": {"h100": float("nan")}}}, "cost.prices.h100: Input should be a finite number"),
        ({"cost": {"prices": {"h100": True}}}, "cost.prices: expected a number, got a boolean"),
        ({"data": {"seed": -1}}, "data.seed: Input should be greater than or equal to 0"),
    ],
)
def test_values_that_would_fail_later_are_refused_now(raw, expected):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    assert info.value.lines[0].startswith(expected), info.value.lines


def test_sizes_parse_as_transformers_takes_them():
    assert recipe_from_dict({"export": {"max_shard_size": "500MiB"}}).export.max_shard_size == "500MiB"
    assert recipe_from_dict({"export": {"max_shard_size": 2_000_000}}).export.max_shard_size == "2000000"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the recipe is empty"),
        ("# only a comment\n\n   \n", "the recipe is empty"),
        ("name: a\ntraining:\n  epochs: 1\n  epochs: 3\n", "not valid YAML: duplicate key 'epochs' (first given on line 3)"),
        ("name: a\nname: b\n", "not valid YAML: duplicate key 'name' (first given on line 1)"),
        ("name: a\ndata: &d {sources: [*d]}\n", "line 2: an alias refers to a value that contains it"),
    ],
)
def test_empty_duplicated_and_self_referencing_files_are_refused(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    assert _refused(path)[0].startswith(f"{path}: {expected}")


def _alias_bomb() -> str:
    text, previous = 'name: bomb\nx0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n', "x0"
    for level in range(1, 9):
        text += f"x{level}: &x{level} [{', '.join([f'*{previous}'] * 9)}]\n"
        previous = f"x{level}"
    return text + f"data: {{system_prompt: *{previous}}}\n"  # 9^9 = 387 million strings once expanded


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_alias_bomb(), "values once its aliases are expanded, above the limit of 50,000"),
        ("name: deep\ntraining: " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid YAML"),
        ("name: deep\ntraining: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested more than 32 levels deep (line 2)"),
        ("name: huge\n# " + "x" * 50_000_000 + "\n", f"50,000,014 bytes, above the {MAX_RECIPE_BYTES:,} a recipe may have"),
    ],
)
def test_hostile_yaml_is_refused_in_well_under_a_second(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    started = time.perf_counter()
    lines = _refused(path)
    assert time.perf_counter() - started < 1.0
    assert lines[0].startswith(f"{path}: ") and expected in lines[0], lines


def test_an_alias_bomb_in_a_set_override_is_refused_too():
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x]"] + ["[" + ", ".join(["*a"] * 9) + "]"] * 700) + "]"
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [f"data.system_prompt={bomb}"])
    assert "values once its aliases are expanded" in info.value.lines[0]


def test_url_sources_written_in_a_recipe_file_stay_urls(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  sources:\n    - path: https://example.com/rows.jsonl\n    - path: s3://bucket/train/*.jsonl\n"
                    "    - path: rows.jsonl\n  eval_sources:\n    - path: gs://bucket/eval.jsonl\n")
    recipe = load_recipe(path)
    assert [s.path for s in recipe.data.sources] == ["https://example.com/rows.jsonl", "s3://bucket/train/*.jsonl", str(tmp_path / "rows.jsonl")]
    assert recipe.data.eval_sources[0].path == "gs://bucket/eval.jsonl"


def test_an_unreachable_url_source_is_a_clear_data_error():
    from data_prep.readers import DataError
    from data_prep.sources import iter_chunks
    from recipes.schema import DataSource

    with pytest.raises(DataError) as info:
        list(iter_chunks(DataSource(path="http://127.0.0.1:9/rows.jsonl")))
    assert str(info.value).startswith("http://127.0.0.1:9/rows.jsonl: cannot read it (")
    assert "is the network reachable from here" in str(info.value)


def test_what_a_recipe_names_on_this_machine_is_checked_before_any_work(tmp_path):
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    recipe = recipe_from_dict({
        "data": {"sources": [{"path": str(tmp_path / "missing.jsonl")}, {"path": "https://example.com/rows.jsonl"}]},
        "model": {"chat_template": "{% for m in messages %}{{ m.content }"},
        "cost": {"price_file": str(tmp_path / "prices.yaml")},
        "registry": {"uri": str(a_file / "registry")},
        "evaluation": {"safety": {"red_team_files": [str(tmp_path / "probes.jsonl")]}},
    })
    assert recipe_problems(recipe, "/proc/ftpipe-runs") == [
        f"data.sources[0].path: {tmp_path / 'missing.jsonl'}: file not found",
        "model.chat_template: not a valid Jinja template (line 1): unexpected '}'",
        f"evaluation.safety.red_team_files[0]: file not found: {tmp_path / 'probes.jsonl'}",
        f"cost.price_file: cannot read {tmp_path / 'prices.yaml'}: [Errno 2] No such file or directory: '{tmp_path / 'prices.yaml'}'",
        "--output-dir: cannot write in /proc (No such file or directory), so /proc/ftpipe-runs cannot be written",
        f"registry.uri: {a_file} is a file, not a folder (for {a_file / 'registry'})",
    ]
    (tmp_path / "prices.yaml").write_text("h100: .nan\n")
    assert recipe_problems(recipe.model_copy(update={"registry": recipe.registry.model_copy(update={"uri": str(tmp_path)})}))[3] == \
        f"cost.price_file: {tmp_path / 'prices.yaml'}: h100: nan is not a price (USD an hour, >= 0)"


def test_explicit_target_modules_are_checked_against_the_base_models_modules():
    from training.families import family_for
    from training.tiny import tiny_config

    recipe = recipe_from_dict({"model": {"base": "tiny:qwen3"}, "training": {"lora": {"target_modules": ["q_proj", "qkv_proj", "mlp.down_proj"]}}})
    (problem,) = target_module_problems(recipe, tiny_config(family_for("qwen3")))
    assert problem.startswith("training.lora.target_modules[1]: 'qkv_proj' is no module of qwen3 (tiny model); its linear layers "
                              "are named down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


def test_validate_refuses_the_issues_recipes_with_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntraining:\n  lora:\n    target_modules: [q_proj, qkv_proj]\nregistry:\n  uri: /proc/registry\n"
                    "cost:\n  price_file: prices.yaml\n")
    result = run_ftpipe("validate", str(path), "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("W1")]  # torch's import warnings
    assert lines == [
        f"cost.price_file: cannot read {tmp_path / 'prices.yaml'}: [Errno 2] No such file or directory: '{tmp_path / 'prices.yaml'}'",
        "registry.uri: cannot write in /proc (No such file or directory), so /proc/registry cannot be written",
        "training.lora.target_modules[1]: 'qkv_proj' is no module of llama (tiny model); its linear layers are named down_proj, "
        "embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ]


def _folder_with_code(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config and tokenizer name custom code that leaves a marker file when imported."""
    from training.families import family_for
    from training.tiny import tiny_config, train_tokenizer

    folder, marker = tmp_path / "model", tmp_path / "code-ran"
    tiny_config(family_for("llama")).save_pretrained(folder)
    train_tokenizer(family_for("llama"), ["Answer briefly. First question? First answer."]).save_pretrained(folder)
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (folder / "configuration_evil.py").write_text(payload)
    (folder / "tokenization_evil.py").write_text(payload.replace("LlamaConfig as EvilConfig", "PreTrainedTokenizerFast as EvilTokenizer"))
    for name, auto in (("config.json", {"AutoConfig": "configuration_evil.EvilConfig"}),
                       ("tokenizer_config.json", {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, "auto_map": auto}))
    return folder, marker


def test_validate_reports_what_trust_remote_code_would_run_and_runs_none_of_it(tmp_path):
    folder, marker = _folder_with_code(tmp_path)
    result = run_ftpipe("validate", "quickstart", "--set", f"model.base={folder}", "--set", "model.trust_remote_code=true",
                        "--output-dir", str(tmp_path / "runs"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert (f"warning: model.trust_remote_code: a run will import and execute code from {folder}: AutoConfig -> "
            "configuration_evil.EvilConfig, AutoTokenizer -> [None, 'tokenization_evil.EvilTokenizer']; files configuration_evil.py, "
            "tokenization_evil.py. validate did not run it.") in result.stderr


def test_a_pickle_the_loader_refuses_and_a_broken_template_are_input_errors(tmp_path):
    import os

    from jinja2.exceptions import TemplateSyntaxError
    from transformers import AutoModelForCausalLM

    from flows.cli import EXIT_INPUT, exit_code_for
    from training.families import family_for
    from training.models import ModelLoadError, refused_input
    from training.tiny import tiny_config

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "model"
    tiny_config(family_for("llama")).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    with pytest.raises(pickle.UnpicklingError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert not marker.exists()
    assert exit_code_for(info.value) == EXIT_INPUT
    assert isinstance(refused_input(info.value), ModelLoadError)
    assert str(refused_input(info.value)).startswith("model weights: refused to unpickle a checkpoint that is not plain tensors")
    assert exit_code_for(TemplateSyntaxError("unexpected '}'", 1)) == EXIT_INPUT
    assert exit_code_for(RuntimeError("a bug")) == 3


def test_a_template_transformers_compiles_is_not_refused():
    template = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}"
    assert recipe_problems(recipe_from_dict({"model": {"chat_template": template}})) == []
