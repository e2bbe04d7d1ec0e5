"""Metrics of generated answers against references, each selectable per evaluation suite.

Per-example metrics give every example a score in [0, 1] (so two models can be compared example by example);
corpus metrics (macro-F1) are computed over the whole suite. Maintained implementations where they exist:
ROUGE-L from `rouge-score`, JSON Schema from `jsonschema`, macro-F1 from scikit-learn.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str, _options: "MetricOptions") -> float:
    return float(prediction.strip() == reference.strip())


def normalised_exact_match(prediction: str, reference: str, _options: "MetricOptions") -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str, _options: "MetricOptions") -> float:
    """SQuAD token F1 over normalised words."""
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, _options: "MetricOptions") -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def json_valid(prediction: str, _reference: str, _options: "MetricOptions") -> float:
    return float(_parse_json(prediction) is not _INVALID)


def json_schema_valid(prediction: str, _reference: str, options: "MetricOptions") -> float:
    """The answer parses as JSON and conforms to the suite's JSON schema."""
    value = _parse_json(prediction)
    return float(value is not _INVALID and options.schema_validator().is_valid(value))


def json_field_accuracy(prediction: str, reference: str, _options: "MetricOptions") -> float:
    """Share of the reference object's top-level fields that the answer reproduces exactly."""
    expected, predicted = _parse_json(reference), _parse_json(prediction)
    if not isinstance(expected, dict) or not expected:
        return float(predicted == expected)
    if not isinstance(predicted, dict):
        return 0.0
    return sum(predicted.get(key, _INVALID) == value for key, value in expected.items()) / len(expected)


def regex_match(prediction: str, _reference: str, options: "MetricOptions") -> float:
    """The whole answer matches the suite's regular expression."""
    return float(options.compiled_regex().fullmatch(prediction.strip()) is not None)


def label_accuracy(prediction: str, reference: str, _options: "MetricOptions") -> float:
    """Classification-style answers: the label, compared without case or surrounding space."""
    return float(prediction.strip().lower() == reference.strip().lower())


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """Macro-averaged F1 over the reference labels (scikit-learn); predictions outside them count as wrong."""
    from sklearn.metrics import f1_score

    labels = sorted({r.strip().lower() for r in references})
    return float(f1_score([r.strip().lower() for r in references], [p.strip().lower() for p in predictions],
                          labels=labels, average="macro", zero_division=0))


@dataclass
class MetricOptions:
    """What some metrics need from their suite: a JSON schema, a regular expression."""

    json_schema: dict | None = None
    regex: str | None = None

    def schema_validator(self):
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.json_schema)

    def compiled_regex(self) -> re.Pattern:
        return re.compile(self.regex, re.DOTALL)


PerExample = Callable[[str, str, MetricOptions], float]
PER_EXAMPLE: dict[str, PerExample] = {
    "exact_match": exact_match,
    "normalized_exact_match": normalised_exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "json_valid": json_valid,
    "json_schema": json_schema_valid,
    "json_field_accuracy": json_field_accuracy,
    "regex_match": regex_match,
    "label_accuracy": label_accuracy,
}
CORPUS: dict[str, Callable[[list[str], list[str]], float]] = {"label_macro_f1": macro_f1}
GENERATION = (*PER_EXAMPLE, *CORPUS)  # the metrics that need the model's answers


def score_outputs(metrics: list[str], predictions: list[str], references: list[str], options: MetricOptions) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(suite means, per-example scores) of the generation metrics named (model-scored ones are left to the caller)."""
    per_example = [{name: PER_EXAMPLE[name](p, r, options) for name in metrics if name in PER_EXAMPLE}
                   for p, r in zip(predictions, references, strict=True)]
    means = {name: sum(e[name] for e in per_example) / len(per_example) for name in metrics if name in PER_EXAMPLE and per_example}
    means.update({name: CORPUS[name](predictions, references) for name in metrics if name in CORPUS})
    return means, per_example


_INVALID = object()


def _parse_json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return _INVALID


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER
