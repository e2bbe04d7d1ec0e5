"""Evaluation metrics and suites: each metric on known answers, and suite options validated in the recipe."""
from __future__ import annotations

import pytest

from evaluation.metrics import GENERATION, MetricOptions, macro_f1, score_outputs
from recipes import RecipeError, load_recipe
from recipes.schema import GENERATION_METRICS
from tests.conftest import ROOT

SCHEMA = {"type": "object", "properties": {"team": {"enum": ["billing", "shipping"]}}, "required": ["team"]}
OPTIONS = MetricOptions(json_schema=SCHEMA, regex=r"[A-Z]{3}-\d+")


def one(metric: str, prediction: str, reference: str) -> float:
    return score_outputs([metric], [prediction], [reference], OPTIONS)[0][metric]


@pytest.mark.parametrize("metric, prediction, reference, expected", [
    ("exact_match", " The cat. ", "The cat.", 1.0),
    ("exact_match", "the cat", "The cat.", 0.0),
    ("normalized_exact_match", "the Cat!", "A cat", 1.0),
    ("token_f1", "the black cat sat", "a cat sat down", 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # 2 of 3 words each way
    ("token_f1", "", "", 1.0),
    ("rouge_l", "the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("rouge_l", "dogs bark loudly", "the cat sat on the mat", 0.0),
    ("json_valid", '{"team": "billing"}', "", 1.0),
    ("json_valid", '{"team": billing}', "", 0.0),
    ("json_schema", '{"team": "billing"}', "", 1.0),
    ("json_schema", '{"team": "sales"}', "", 0.0),
    ("json_schema", "not json", "", 0.0),
    ("json_field_accuracy", '{"team": "billing", "priority": "low"}', '{"team": "billing", "priority": "high"}', 0.5),
    ("json_field_accuracy", "[1]", '{"team": "billing"}', 0.0),
    ("regex_match", "ABC-123", "", 1.0),
    ("regex_match", "ABC-123 extra", "", 0.0),
    ("label_accuracy", " Positive", "positive", 1.0),
])
def test_each_metric_on_known_answers(metric, prediction, reference, expected):
    assert one(metric, prediction, reference) == pytest.approx(expected)


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "the cat is on the mat" and "the cat sat on the mat" is 5 of 6 words each way
    assert one("rouge_l", "the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)


def test_macro_f1_averages_per_label_f1():
    references = ["a", "a", "b", "b", "c"]
    predictions = ["a", "b", "b", "b", "x"]
    # a: p=1 r=.5 f=2/3; b: p=2/3 r=1 f=.8; c: p=0 r=0 f=0
    assert macro_f1(predictions, references) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    means, per_example = score_outputs(["label_accuracy", "label_macro_f1"], predictions, references, OPTIONS)
    assert means == pytest.approx({"label_accuracy": 0.6, "label_macro_f1": (2 / 3 + 0.8) / 3}) and len(per_example) == 5


def test_the_schema_and_the_metric_registry_name_the_same_metrics():
    assert set(GENERATION) == set(GENERATION_METRICS)


QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.suites=[{metrics: [json_schema]}]"], "metric json_schema needs json_schema"),
    (["evaluation.suites=[{metrics: [regex_match]}]"], "metric regex_match needs regex"),
    (["evaluation.suites=[{metrics: [regex_match], regex: '[a-'}]"], "regex '[a-' does not compile"),
    (["evaluation.suites=[{metrics: [json_schema], json_schema: {type: 12}}]"], "json_schema is not a valid JSON schema"),
    (["evaluation.suites=[{metrics: [json_schema], json_schema: missing.json}]"], "json_schema file not found"),
    (["evaluation.suites=[{metrics: [exact_match]}, {metrics: [eval_loss]}]"], "suites: names must differ"),
    (["evaluation.suites=[{sources: [{path: x.jsonl}]}]"], "the 'heldout' suite is the held-out split"),
    (["evaluation.suites=[{metrics: [bleu]}]"], "evaluation.suites.0.metrics.0"),
    (["evaluation.gates=[{metric: extra.exact_match, min: 1}]"], "gates[0].metric 'extra.exact_match' is not measured by any suite"),
])
def test_suite_options_are_checked_when_the_recipe_loads(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, overrides)
    assert message in str(info.value)


def test_a_named_suite_gates_by_suite_and_metric():
    recipe = load_recipe(QUICKSTART, ["evaluation.suites=[{metrics: [exact_match]}, {name: extra, sources: [{path: x.jsonl}], metrics: [rouge_l]}]",
                                      "evaluation.gates=[{metric: extra.rouge_l, min: 0.5}]"])
    assert recipe.evaluation.metric_keys()[:2] == ["exact_match", "extra.rouge_l"]


def test_generation_is_greedy_by_default_and_sampling_is_seeded(tiny_refs, tokenizers):
    from evaluation.generate import generate, load_model
    from recipes.schema import GenerationSection
    from tests.conftest import SAMPLE_HELDOUT, read_rows

    tokenizer = tokenizers["llama"]
    model = load_model(tiny_refs["llama"].path, tokenizer=tokenizer)
    conversations = [row["messages"] for row in read_rows(SAMPLE_HELDOUT, 4)]
    greedy = GenerationSection()
    assert greedy.sampling() == {"do_sample": False}
    first = generate(model, tokenizer, conversations, 12, 4, greedy.sampling())
    assert generate(model, tokenizer, conversations, 12, 2, greedy.sampling()) == first  # batching does not change greedy answers
    sampled = GenerationSection(do_sample=True, temperature=1.5, seed=7)
    draws = [generate(model, tokenizer, conversations, 12, 4, sampled.sampling(), sampled.seed) for _ in range(2)]
    assert draws[0] == draws[1] != first  # same seed, same draws; not the greedy answers
