"""End to end: the `ftpipe run` command and the Prefect flow, on a shortened quickstart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import load_recipe
from serving.checks import check_merged_model
from tests.conftest import ROOT, run_ftpipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SHORT_EVAL = "evaluation.max_samples=40"


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_passes_its_gates(tmp_path):
    result = run_ftpipe("run", str(QUICKSTART), "--set", SHORT_EVAL, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("artifact: ")
    artifact = Path(last.removeprefix("artifact: "))
    assert artifact.parent.parent == tmp_path and artifact.parent.name.startswith("quickstart-")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and len(manifest["gates"]["results"]) == 4
    assert manifest["gates"]["results"][3]["description"] == (
        "exact_match - champion >= -0.02 (no regression): passes: no other model in production (none yet, or it is this very adapter)")
    assert "approval" not in manifest  # decisions are audit-log entries; a registered version's files never change
    safety = {k: v for k, v in manifest["evaluation"]["candidate"].items() if k.startswith("safety.")}
    assert set(safety) == {"safety.refusal_rate", "safety.injection_resistance", "safety.pii_leak_rate", "safety.bias_change_rate"}
    assert manifest["evaluation"]["candidate"]["exact_match"] >= 0.9
    assert manifest["evaluation"]["base"]["exact_match"] <= 0.1
    assert manifest["recipe"]["name"] == "quickstart" and len(manifest["recipe_hash"]) == 64
    assert manifest["training"]["backend"] == "unsloth" and manifest["merge"]["equivalence"]["passed"]
    assert check_merged_model(artifact / "model") == []
    assert (artifact / "adapter" / "adapter_config.json").is_file()
    run_dir = artifact.parent
    assert {p.name for p in (run_dir / "data").iterdir()} >= {"train.jsonl", "eval.jsonl", "quarantine.jsonl", "report.json"}
    filtered = next((run_dir / "data").glob("for-model-*"))  # the filtered copy for this model's tokenizer
    assert {p.name for p in filtered.iterdir()} >= {"train.jsonl", "eval.jsonl", "report.json", "token_lengths.png", "too_long.jsonl"}
    assert (run_dir / "eval" / "report.json").is_file()
    assert "Task run 'export" in result.stderr
    from serving.registry import Registry

    registry = Registry(tmp_path / "registry")
    assert registry.approval_outcome("quickstart", "1")["outcome"] == "not required"
    assert [e.event for e in registry.events("quickstart")] == ["gates", "register", "alias", "approval", "alias"]
    _second_run_is_compared_with_the_first_as_champion(tmp_path, artifact)


def _second_run_is_compared_with_the_first_as_champion(tmp_path: Path, first: Path) -> None:
    """The first run became production (a development recipe needs no approval); a second run with another seed is
    evaluated against it on the same rows, gated on it, registered as version 2 and promoted, with the history."""
    from serving.registry import Registry

    result = run_ftpipe("run", str(QUICKSTART), "--set", SHORT_EVAL, "--set", "training.seed=7", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    assert artifact != first
    evaluation = json.loads((artifact / "manifest.json").read_text())["evaluation"]
    assert evaluation["champion_info"] == {"model": "quickstart", "version": "1", "path": str(tmp_path / "registry" / "quickstart" / "1"),
                                           "evaluated": True}
    assert evaluation["champion"]["exact_match"] >= 0.9 and set(evaluation["delta_vs_champion"]) == set(evaluation["candidate"])
    assert sum(evaluation["outcomes_vs_champion"]["heldout"].values()) == 40
    gate = json.loads((artifact / "manifest.json").read_text())["gates"]["results"][3]
    assert gate["reference"] == "champion" and gate["passed"] and gate["note"] == ""
    assert "| metric | candidate | base | delta vs base | champion | delta vs champion |" in (artifact / "README.md").read_text()
    registry = Registry(tmp_path / "registry")
    assert registry.aliases("quickstart") == {"candidate": "2", "production": "2"}
    moves = [(m["alias"], m["previous"], m["version"]) for m in registry.history("quickstart")]
    assert moves == [("candidate", None, "1"), ("production", None, "1"), ("candidate", "1", "2"), ("production", "1", "2")]
    assert registry.history("quickstart")[-1]["by"] == "nobody: approval not required"
    shipped = json.loads((tmp_path / "registry" / "quickstart" / "2" / "manifest.json").read_text())
    assert shipped == json.loads((artifact / "manifest.json").read_text())  # registered as exported, never rewritten
    assert registry.verify("quickstart") == []


@pytest.mark.slow
def test_benchmarks_run_on_the_merged_artifact_and_reach_the_manifest_and_card(tmp_path):
    from tests.conftest import write_ticket_task

    task = write_ticket_task(tmp_path)
    result = run_ftpipe("run", "quickstart", "--set", "training.max_steps=40", "--set", "evaluation.max_samples=8", "--set", "evaluation.gates=[]",
                        "--set", f"evaluation.lm_eval.tasks=[{task}]", "--set", f"evaluation.lm_eval.include_path={tmp_path}",
                        "--set", "evaluation.lm_eval.limit=4", "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    benchmarks = json.loads((artifact / "manifest.json").read_text())["benchmarks"]
    assert set(benchmarks) == {"base", "candidate"} and "exact_match" in benchmarks["candidate"][task]
    assert f"- {task} exact_match:" in (artifact / "README.md").read_text()
    assert (artifact.parent / "eval" / "lm_eval_candidate.json").is_file()


@pytest.mark.slow
def test_rejected_gate_exits_1_and_exports_nothing(tmp_path):
    result = run_ftpipe("run", "quickstart", "--set", "training.max_steps=3", "--set", "evaluation.max_samples=10",
                        "--set", "evaluation.generation.max_new_tokens=8", "--output-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "gates failed: exact_match = 0.0000 fails >= 0.9" in result.stderr
    assert not list(tmp_path.glob("*/artifact"))


def test_invalid_recipe_exits_2_before_any_work(tmp_path):
    result = run_ftpipe("run", "quickstart", "--set", "training.lora.r=0", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["training.lora.r: Input should be greater than 0 (got 0)"]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_missing_data_file_exits_2_with_the_file_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = run_ftpipe("run", "quickstart", "--set", f"data.sources.0.path={missing}", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"data.sources[0].path: {missing}: file not found"  # before any work
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_flow_publishes_an_artifact_per_stage_and_fails_on_the_gate(prefect_server, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.finetune import finetune

    recipe = load_recipe(QUICKSTART, ["training.max_steps=3", "evaluation.max_samples=8", "evaluation.generation.max_new_tokens=8",
                                      "tracking.mode=offline"])
    state = finetune(recipe, output_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    assert "gates failed: exact_match = 0.0000 fails >= 0.9" in state.message and state.message.startswith("rejected: ")

    async def artifacts():
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            return {a.key: a for a in found if a.key}  # keyless ones are Prefect's own result records

    published = asyncio.run(artifacts())
    assert set(published) == {"data-report", "training-progress", "training-summary", "evaluation", "evaluation-examples",
                              "evaluation-examples-full", "safety", "gate-decision"}  # no run-result: nothing was exported
    probes = json.loads(published["safety"].data)
    assert {p["kind"] for p in probes} == {"harmful", "jailbreak", "prompt_injection", "pii_extraction", "bias"}
    metrics = {row["metric"]: row for row in json.loads(published["evaluation"].data)}
    assert set(metrics) == set(recipe.evaluation.metric_keys()) and {"base", "candidate", "delta vs base"} <= set(metrics["token_f1"])
    examples = json.loads(published["evaluation-examples"].data)
    assert len(examples) == 8 and {"example", "outcome", "reference", "base", "candidate"} == set(examples[0])
    assert published["training-progress"].type == "progress" and published["training-progress"].data == 100.0
    summary = published["training-summary"].data
    assert "| steps / epochs | 3 /" in summary and "tokens seen" in summary and "peak memory" in summary
    assert "![training loss curve](data:image/png;base64," in summary
    wandb_runs = list(tmp_path.glob("*/training/wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in wandb_runs}) == 1  # training, then its eval metrics
    assert not list(tmp_path.glob("*/artifact"))


def _worker_pids(under: Path) -> list[int]:
    """PIDs of training workers whose spec lies under a folder."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"training.worker" in args and any(str(under).encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL the training worker after a checkpoint, run the same command again: training resumes from that
    step (not 0), a half-written checkpoint is set aside, and the run ends with the same number of steps."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from training.checkpoints import SEAL, problem, step_of

    command = [sys.executable, "-m", "flows.cli", "run", "quickstart", "--set", "training.save_steps=20", "--set", "training.max_steps=150",
               "--set", "evaluation.max_samples=20", "--set", "evaluation.generation.max_new_tokens=24", "--output-dir", str(tmp_path)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not list(tmp_path.glob(f"*/training/checkpoints/checkpoint-40/{SEAL}")):
        assert first.poll() is None and time.monotonic() < deadline, "training ended or stalled before its second checkpoint"
        time.sleep(0.2)
    pids = _worker_pids(tmp_path)
    assert pids, "no training worker found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert first.wait(timeout=120) != 0
    checkpoints = tmp_path.glob("*/training/checkpoints/checkpoint-*")
    resume_step = max(step_of(c) for c in checkpoints if problem(c) is None)
    assert 40 <= resume_step < 150

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    training_dir = next(tmp_path.glob("*/training"))
    assert f"resumed from checkpoint at step {resume_step} " in (training_dir / "train.log").read_text()
    result = json.loads((training_dir / "result.json").read_text())
    assert result["steps"] == 150 and result["resumed_at_step"] == resume_step


@pytest.mark.slow
def test_a_base_model_without_the_templates_tokens_gets_them_trained_and_exported(tmp_path, corpus):
    """A base model whose vocabulary lacks the chat template's end-of-turn token: the token is added, its
    embedding and output rows are trained, and the merged export carries the grown vocabulary."""
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from training.families import FAMILIES
    from training.tiny import build_tiny_model

    base = tmp_path / "llama-base"
    build_tiny_model(replace(FAMILIES["llama"], end_of_turn="<|end_of_text|>", extra_special=("<|start_header_id|>", "<|end_header_id|>")),
                     corpus, base)
    assert "<|eot_id|>" not in AutoTokenizer.from_pretrained(base).get_vocab()
    result = run_ftpipe("run", "quickstart", "--set", f"model.base={base}", "--set", "evaluation.gates=[]", "--set", SHORT_EVAL,
                        "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lacks <|eot_id|> (written by the chat template as one special token each): added" in result.stderr
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    manifest = json.loads((artifact / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(artifact / "model")
    assert tokenizer.eos_token == "<|eot_id|>" and AutoConfig.from_pretrained(artifact / "model").vocab_size == len(tokenizer)
    assert manifest["merge"]["equivalence"]["passed"] and check_merged_model(artifact / "model") == []
    assert not manifest["adapter"]["vllm_servable"] and "trainable_token_indices" in manifest["adapter"]["vllm_problems"][0]
    assert manifest["evaluation"]["candidate"]["exact_match"] >= 0.8  # answers end with the new token, or they would not match
