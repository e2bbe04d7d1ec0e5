"""What the Prefect UI and REST API show a user, without a server: the overrides schema Prefect enforces at
submission, expected failures without tracebacks, the training progress line, tables narrow enough for the UI."""
from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from recipes import RecipeError, resolve_recipe
from recipes.overrides import overrides_json_schema, override_patterns
from tests.conftest import ROOT, SHORT_RUN


def parameter_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    return parameter_schema(finetune.fn).model_dump_for_openapi()


def refusal(parameters: dict) -> str | None:
    """What Prefect's server says to these parameters with the deployment's schema enforced (None: accepted)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, parameter_schema(), raise_on_error=True)
    except ValidationError as error:
        return str(error)
    return None


@pytest.mark.parametrize("overrides", [
    None, {}, SHORT_RUN, {"training": {"lora": {"r": 8}, "epochs": 2}}, {"training.lora": {"r": 8}},
    {"data.sources.0.path": "other.jsonl"}, {"model.chat_template_kwargs.enable_thinking": False},
    {"evaluation.gates": [{"metric": "exact_match", "min": 0.5}]}, {"training.lora.target_modules.0": "q_proj"},
    {"export.max_shard_size": "5GB"}, {"approval.required": True, "name": "reviewed"},
])
def test_overrides_the_flow_accepts_pass_the_submission_schema(overrides):
    assert refusal({"recipe": "quickstart", "overrides": overrides}) is None
    resolve_recipe("quickstart", overrides)  # and the recipe takes them


@pytest.mark.parametrize(("parameters", "expected"), [
    ({"overrides": {"lora.r": 0}}, "Validation failed for field 'overrides'. Failure reason: 'lora.r' is not valid under any of the given schemas"),
    ({"overrides": {"training.lora.rank": 4}}, "'training.lora.rank' is not valid under any of the given schemas"),
    ({"overrides": {"training.lora.r": 0}}, "field \"overrides['training.lora.r']\". Failure reason: 0 is less than or equal to the minimum of 0"),
    ({"overrides": {"training.lora.r": "8"}}, "'8' is not of type 'integer'"),
    ({"overrides": {"training": {"lora": {"rank": 8}}}}, "Additional properties are not allowed ('rank' was unexpected)"),
    ({"overrides": {"evaluation.gates": [{"metrc": "exact_match"}]}}, "('metrc' was unexpected)"),
    ({"overrides": {"data.sources.x.path": "a.jsonl"}}, "'data.sources.x.path' is not valid under any of the given schemas"),
    ({"overrides": {"training.method": "ppo"}}, "'ppo' is not one of"),
    ({"overrides": ["training.epochs=2"]}, "Validation failed for field 'overrides'. Failure reason: ['training.epochs=2'] is not valid"),
    ({"recipe": "quickstrat"}, "Validation failed for field 'recipe'. Failure reason: 'quickstrat' is not one of ['dpo', 'quickstart']"),
    ({"recipe": {"name": "x", "trainig": {}}}, "'trainig' was unexpected"),
])
def test_bad_parameters_are_refused_at_submission_naming_the_field(parameters, expected):
    """What the issue's user sent (lora.r: 0, training.lora.rank, quickstrat) and its neighbours: each refused by the
    schema the deployment enforces, the message naming the key or field."""
    message = refusal({"recipe": "quickstart", **parameters})
    assert message is not None and expected in message, message


def test_every_overridable_key_is_a_field_of_the_recipe():
    """The schema is derived from the recipe schema, never written by hand: a pattern naming no field would let a
    misspelt path through to a run. Each path, set to the quickstart's own value, may be refused for that value (an
    index past a list's end), never as an unknown key."""
    quickstart = resolve_recipe("quickstart").model_dump(mode="json")
    for pattern in override_patterns():
        path = pattern[1:-1].replace(r"\d+", "0").replace("[^.]+", "key").replace("\\", "")
        try:
            resolve_recipe("quickstart", {path: _value_at(quickstart, path)})
        except RecipeError as error:
            assert not any("unknown key" in line for line in error.lines), (path, error.lines)


def _value_at(value, path: str):
    for key in path.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return None
    return value


def test_every_shipped_recipe_validates_as_an_inline_recipe_and_as_overrides():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        dumped = resolve_recipe(path.stem).model_dump(mode="json")
        assert refusal({"recipe": dumped}) is None, path
        assert refusal({"recipe": "quickstart", "overrides": raw}) is None, path


def test_the_schema_is_what_the_deployments_enforce():
    from flows.deployments import deployments

    for deployment in deployments("runs"):
        assert deployment.enforce_parameter_schema is True
        if "overrides" in deployment._parameter_openapi_schema.properties:
            assert deployment._parameter_openapi_schema.properties["overrides"]["propertyNames"] == overrides_json_schema()["propertyNames"]
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["finetune"]["enforce_parameter_schema"] is True


def test_an_expected_failure_ends_the_run_failed_with_its_own_lines_and_no_traceback(caplog):
    """A bad recipe through the flow itself (what schema checks cannot see: a gate on the quantized export without
    one): Failed, the recipe's line as the state's message and in the log, no traceback in any record; ftpipe run
    still gets the RecipeError to map to exit 2."""
    from flows.finetune import finetune

    caplog.set_level(logging.INFO)
    state = finetune("quickstart", overrides={"evaluation.gates": [{"metric": "quantized.exact_match", "min": 0.5}]}, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("invalid input: recipe: evaluation.gates[0].metric quantized.exact_match: measured on the quantized export")
    assert isinstance(state.result(raise_on_failure=False), RecipeError)
    # (what reaches the run's log is checked over REST in test_deployments: caplog sees Prefect's records only when
    # Prefect's logging setup lets them propagate, which depends on the tests run before)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_an_unexpected_error_keeps_its_traceback():
    from flows.failures import _DropExpectedTracebacks

    def record(error, message="Engine execution exited with unexpected exception"):
        try:
            raise error
        except Exception:
            import sys

            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, message, None, sys.exc_info())

    bug = record(ZeroDivisionError("bug"), "Task run failed with exception: %r")
    assert _DropExpectedTracebacks().filter(bug) and bug.exc_info is not None
    assert not _DropExpectedTracebacks().filter(record(RecipeError(["training.lora.r: bad"])))
    refused = record(RecipeError(["data.sources[0].path: x: file not found"]), "Task run failed with exception: %r")
    assert _DropExpectedTracebacks().filter(refused) and refused.exc_info is None  # the line stays, its traceback goes


def test_progress_says_step_loss_tokens_per_second_and_time_left():
    from training.progress import ProgressMeter, parse_step_line

    meter = ProgressMeter()
    first = parse_step_line("step 10/60 loss 2.718281828459045 lr 2.00e-03 tokens 10240")
    assert meter.describe(first, now=100.0) == (16.7, "step 10 of 60 · loss 2.718")
    later = parse_step_line("step 30/60 loss 0.4312 lr 1.00e-03 tokens 30720")
    assert meter.describe(later, now=110.0) == (50.0, "step 30 of 60 · loss 0.4312 · 2,048 tokens/s · about 15 s left")
    slow = parse_step_line("step 31/6000 loss 0.43 lr 1.00e-03")  # a worker line without tokens
    assert meter.describe(slow, now=130.0)[1] == "step 31 of 6000 · loss 0.43 · about 2 h 22 min left"  # 5,969 steps at 21 per 30 s
    assert parse_step_line("trained 60 steps in 3.0s") is None


def test_the_worker_logs_loss_at_least_every_few_seconds_whatever_logging_steps_says():
    from transformers import TrainerControl, TrainerState

    from training.progress import PROGRESS_EVERY_S
    from training.sft import BatchStats, trainer_callbacks

    log_loss = trainer_callbacks(BatchStats(0.0, 1.0))[0]
    state, control = TrainerState(global_step=5, max_steps=1000), TrainerControl()
    log_loss.on_step_end(None, state, control)
    assert not control.should_log  # logged a moment ago (the callback was made now)
    log_loss.logged_at -= PROGRESS_EVERY_S
    log_loss.on_step_end(None, state, control)
    assert control.should_log


def test_tables_fit_the_ui_and_link_to_the_full_text(tmp_path):
    """The per-example table shares ROW_TEXT_CHARS among its text columns (more models, shorter cells); the full
    report has each example, prompt included, under the name the table shows."""
    from flows.reports import ROW_TEXT_CHARS, example_report_markdown, example_table, number, safety_table

    long = "word " * 100 + "THE-END"
    example = {"outcome": "win", "prompt": long, "reference": "billing " * 20, "base_output": "", "candidate_output": long}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"suites": {"heldout": {"per_example": [example]}}, "safety": {"per_probe": [
        {"kind": "jailbreak", "prompt": long, "base_safe": True, "candidate_safe": True, "candidate_answer": long}]}}))
    row, probe = example_table(str(report))[0], safety_table(str(report))[0]
    assert row["example"] == "heldout #1" and "prompt" not in row
    assert len(probe["prompt"]) + len(probe["candidate answer"]) <= ROW_TEXT_CHARS
    assert sum(len(row[k]) for k in ("reference", "base", "candidate")) <= ROW_TEXT_CHARS and row["candidate"].endswith("…")
    report.write_text(json.dumps({"suites": {"heldout": {"per_example": [example | {"champion_output": long, "outcome_vs_champion": "tie"}]}}}))
    row = example_table(str(report))[0]
    assert sum(len(row[k]) for k in ("reference", "base", "candidate", "champion")) <= ROW_TEXT_CHARS and row["vs champion"] == "tie"
    full = example_report_markdown(str(report))
    assert "### heldout #1" in full and full.count("THE-END") == 3 and "`` (empty) ``" in full and str(report) in full
    assert number(0.43125678901234567) == "0.4313" and number(12) == "12" and number(None) == "None"


def test_the_data_report_tables_name_sources_by_file_and_list_the_paths(tmp_path):
    from data_prep.prepare import prepare_data
    from flows.reports import data_report_markdown
    from recipes import load_recipe

    data = prepare_data(load_recipe(ROOT / "recipes" / "quickstart.yaml").data, tmp_path / "data")
    markdown = data_report_markdown(data)
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table_rows and all(str(ROOT) not in line for line in table_rows)  # no long paths inside a table
    assert max(len(line.split("|")) for line in table_rows) <= 9
    assert re.search(r"- support_tickets_train\.jsonl: `/.*/support_tickets_train\.jsonl`", markdown)
