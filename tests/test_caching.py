"""Stage caching and retries, through the real flow on Prefect's test server: an unchanged recipe re-uses its
stages (Cached), --force runs them again, a cached result whose files were deleted is not re-used, a change re-runs
only the stages that read it, and an I/O failure is retried while a bad input is not."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import flows.finetune as finetune_module
from flows.caching import transient_failure
from flows.finetune import prepare
from recipes import resolve_recipe

DATA_STAGES = ("prepare-data", "resolve-model", "filter-tokens")


def stage_states(state) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def run_prepare(output_dir, **kwargs):
    state = prepare(kwargs.pop("recipe", "quickstart"), output_dir=str(output_dir), return_state=True, **kwargs)
    assert state.is_completed(), state.message
    return state, stage_states(state)


def test_an_unchanged_recipe_reuses_its_stages_force_reruns_them_and_deleted_files_are_rebuilt(prefect_server, tmp_path):
    _, first = run_prepare(tmp_path)
    assert [first[s] for s in DATA_STAGES] == ["Completed"] * 3
    _, again = run_prepare(tmp_path)
    assert [again[s] for s in DATA_STAGES] == ["Cached"] * 3
    _, forced = run_prepare(tmp_path, force=True)
    assert [forced[s] for s in DATA_STAGES] == ["Completed"] * 3

    state, _ = run_prepare(tmp_path)
    filtered = Path(state.result())  # the model's filtered copy, inside the prepared data's folder
    shutil.rmtree(filtered)
    _, refiltered = run_prepare(tmp_path)
    assert [refiltered[s] for s in DATA_STAGES] == ["Cached", "Cached", "Completed"] and filtered.exists()
    shutil.rmtree(filtered.parent)
    _, rebuilt = run_prepare(tmp_path)
    assert rebuilt["prepare-data"] == "Completed"  # the cached result named files that are gone
    assert filtered.parent.exists()


def test_another_output_folder_does_not_reuse_this_ones_stages(prefect_server, tmp_path):
    run_prepare(tmp_path / "a")
    state, elsewhere = run_prepare(tmp_path / "b")
    assert [elsewhere[s] for s in ("prepare-data", "filter-tokens")] == ["Completed"] * 2
    assert Path(state.result()).is_relative_to(tmp_path / "b")


def test_a_change_reruns_only_the_stages_that_read_it(prefect_server, tmp_path):
    run_prepare(tmp_path)
    _, gate_changed = run_prepare(tmp_path, overrides={"evaluation.gates": []})  # read by no data stage
    assert [gate_changed[s] for s in DATA_STAGES] == ["Cached"] * 3
    _, length_changed = run_prepare(tmp_path, overrides={"training.max_seq_length": 192})  # the token filter reads it
    assert [length_changed[s] for s in DATA_STAGES] == ["Cached", "Cached", "Completed"]


def test_an_io_failure_is_retried_and_a_bad_input_is_not(prefect_server, tmp_path, monkeypatch):
    calls = []
    real = finetune_module.prepare_data

    def flaky(section, out_dir):
        calls.append(out_dir)
        if len(calls) == 1:
            raise ConnectionResetError("the object store dropped the connection")
        return real(section, out_dir)

    monkeypatch.setattr(finetune_module, "prepare_data", flaky)
    monkeypatch.setattr(finetune_module, "prepare_data_task", finetune_module.prepare_data_task.with_options(retry_delay_seconds=0))
    run_prepare(tmp_path, force=True)
    assert len(calls) == 2

    (tmp_path / "garbage.jsonl").write_text("not json\n" * 20)
    recipe = resolve_recipe("quickstart", {"data.sources.0.path": str(tmp_path / "garbage.jsonl")})
    calls.clear()
    monkeypatch.setattr(finetune_module, "prepare_data", lambda section, out_dir: calls.append(1) or real(section, out_dir))
    state = prepare(recipe, output_dir=str(tmp_path), return_state=True)
    assert state.is_failed() and len(calls) == 1 and "data.max_invalid_fraction" in state.message

    missing = resolve_recipe("quickstart", {"data.sources.0.path": str(tmp_path / "missing.jsonl")})  # refused before any stage
    state = prepare(missing, output_dir=str(tmp_path), return_state=True)
    assert state.is_failed() and len(calls) == 1 and f"data.sources[0].path: {tmp_path / 'missing.jsonl'}: file not found" in state.message


@pytest.mark.parametrize(("error", "retried"), [
    (ConnectionResetError("reset"), True), (TimeoutError("slow"), True), (OSError(5, "I/O error"), True),
    (FileNotFoundError("data.jsonl"), False), (PermissionError("denied"), False), (ValueError("bad row"), False),
    (RuntimeError("CUDA out of memory"), False),
])
def test_which_failures_are_retried(error, retried):
    class Failed:
        def result(self, raise_on_failure=True):
            return error

    assert transient_failure(None, None, Failed()) is retried


def test_the_same_data_prepared_into_two_run_folders_keys_the_next_stage_the_same(prepared_small):
    """Two runs that prepared the same data at once each wrote their own folder; whichever result the cache kept,
    the stages after it must find the other's results."""
    from dataclasses import replace

    from flows.caching import stage_key
    from recipes import resolve_recipe

    recipe = resolve_recipe("quickstart")
    moved = replace(prepared_small, train_path="/elsewhere/run-2/data/train.jsonl", eval_path="/elsewhere/run-2/data/eval.jsonl",
                    quarantine_path="/elsewhere/run-2/data/quarantine.jsonl", report_path="/elsewhere/run-2/data/report.json",
                    reused=not prepared_small.reused)
    key = stage_key("filter-tokens", {"data": set()}, {"recipe": recipe, "data": prepared_small})
    assert stage_key("filter-tokens", {"data": set()}, {"recipe": recipe, "data": moved}) == key
    assert stage_key("filter-tokens", {"data": set()}, {"recipe": recipe, "data": replace(moved, train_rows=1)}) != key
