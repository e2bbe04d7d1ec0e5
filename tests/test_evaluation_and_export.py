"""Evaluation, gates, export of the vLLM-ready artifact and the checks that guard it."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from evaluation.gates import decide
from recipes.schema import EvaluationSection, ExportSection, Gate, ModelSection, TrackingSection, TrainingSection
from serving.checks import check_adapter_servable, check_merged_model, check_template_matches_training
from serving.export import ExportError, export_artifact
from tests.conftest import LINEAGE, ROOT, vllm_refusals
from training.train import train

@pytest.fixture(scope="module")
def trained_qlora(prepared_small, tmp_path_factory):
    section = TrainingSection(max_steps=30, batch_size=16, adapter="qlora", max_seq_length=256, learning_rate=3e-3)
    return train(section, ModelSection(base="tiny:qwen2"), TrackingSection(), prepared_small, tmp_path_factory.mktemp("qlora"))


def test_gates_report_every_gate_with_value_and_threshold():
    gates = [Gate(metric="exact_match", min=0.9), Gate(metric="exact_match", min_delta_vs_base=0.5), Gate(metric="eval_loss", max=1.0)]
    decision = decide(gates, candidate={"exact_match": 0.85, "eval_loss": 0.2}, base={"exact_match": 0.1, "eval_loss": 7.0})
    assert not decision.passed
    assert [r.passed for r in decision.results] == [False, True, True]
    assert decision.failure_message() == "1 of 3 gates failed: exact_match = 0.8500 fails >= 0.9"
    assert decision.results[1].describe() == "exact_match - base = 0.7500 passes >= 0.5"
    assert decide([Gate(metric="eval_loss", max_delta_vs_base=-1)], {"eval_loss": 2.0}, {"eval_loss": 2.5}).failure_message() == (
        "1 of 1 gates failed: eval_loss - base = -0.5000 fails <= -1"
    )


def test_no_regression_gates_allow_the_tolerance_in_the_metrics_worse_direction():
    accuracy = Gate(metric="extra.token_f1", no_regression_vs="base", tolerance=0.02)
    loss = Gate(metric="eval_loss", no_regression_vs="base", tolerance=0.1)
    held = decide([accuracy, loss], {"extra.token_f1": 0.79, "eval_loss": 2.05}, {"extra.token_f1": 0.80, "eval_loss": 2.0})
    assert held.passed and held.results[0].describe() == "extra.token_f1 - base = -0.0100 passes >= -0.02 (no regression)"
    dropped = decide([accuracy, loss], {"extra.token_f1": 0.70, "eval_loss": 2.2}, {"extra.token_f1": 0.80, "eval_loss": 2.0})
    assert dropped.failure_message() == ("2 of 2 gates failed: extra.token_f1 - base = -0.1000 fails >= -0.02 (no regression); "
                                         "eval_loss - base = 0.2000 fails <= 0.1 (no regression)")
    with pytest.raises(ValueError, match="tolerance applies to no_regression_vs gates only"):
        Gate(metric="eval_loss", max=1.0, tolerance=0.1)


def test_champion_gates_compare_with_production_and_pass_while_there_is_none():
    gates = [Gate(metric="exact_match", min_delta_vs_champion=0.0), Gate(metric="eval_loss", no_regression_vs="champion", tolerance=0.05)]
    candidate, base = {"exact_match": 0.9, "eval_loss": 0.5}, {"exact_match": 0.1, "eval_loss": 7.0}
    first = decide(gates, candidate, base, champion=None)
    assert first.passed and [r.describe() for r in first.results] == [
        "exact_match - champion >= 0: passes: no other model in production (none yet, or it is this very adapter)",
        "eval_loss - champion <= 0.05 (no regression): passes: no other model in production (none yet, or it is this very adapter)"]
    worse = decide(gates, candidate, base, champion={"exact_match": 0.95, "eval_loss": 0.4})
    assert worse.failure_message() == ("2 of 2 gates failed: exact_match - champion = -0.0500 fails >= 0; "
                                       "eval_loss - champion = 0.1000 fails <= 0.05 (no regression)")
    assert decide(gates, candidate, base, champion={"exact_match": 0.85, "eval_loss": 0.48}).passed


def test_a_champion_gate_needs_the_registry():
    from recipes import Recipe

    gate = {"metric": "exact_match", "no_regression_vs": "champion"}
    with pytest.raises(ValueError, match=r"evaluation.gates\[0\] compares with the champion, which needs registry.enabled"):
        Recipe.model_validate({"evaluation": {"gates": [gate]}, "registry": {"compare_with_champion": False}})
    assert Recipe.model_validate({"evaluation": {"gates": [gate]}}).evaluation.gates[0].reference == "champion"


def test_the_champion_is_scored_on_the_same_rows_with_its_own_tokenizer(artifact, trained_lora, prepared_small, tmp_path):
    """A production artifact with the same merged weights but no adapter of this run (as an export with
    `export.adapter: false` ships): the merged model answers as the adapter model does, so it ties. The artifact
    exported from this very adapter is not compared with itself."""
    from evaluation.evaluate import Champion, evaluate

    section = EvaluationSection(max_samples=12)
    itself = evaluate(section, ModelSection(), trained_lora, prepared_small, tmp_path / "itself", Champion("test", "6", artifact.path))
    assert itself.champion is None and itself.champion_info is None
    merged_only = tmp_path / "merged-only"
    shutil.copytree(artifact.path, merged_only, ignore=shutil.ignore_patterns("adapter"))
    manifest = json.loads((merged_only / "manifest.json").read_text())
    manifest["files"] = {name: digest for name, digest in manifest["files"].items() if not name.startswith("adapter/")}
    (merged_only / "manifest.json").write_text(json.dumps(manifest))
    result = evaluate(section, ModelSection(), trained_lora, prepared_small, tmp_path, Champion("test", "7", str(merged_only)))
    assert result.champion_info == {"model": "test", "version": "7", "path": str(merged_only), "evaluated": True}
    assert set(result.champion) == set(result.candidate)
    assert result.champion["exact_match"] == result.candidate["exact_match"]
    assert abs(result.delta_vs_champion["eval_loss"]) < 0.05  # bf16 weights against the float32 adapter model
    assert result.outcomes_vs_champion["heldout"] == {"win": 0, "loss": 0, "tie": 12}
    report = json.loads(Path(result.report_path).read_text())
    example = report["suites"]["heldout"]["per_example"][0]
    assert example["champion_output"] == example["candidate_output"] and example["outcome_vs_champion"] == "tie"
    assert report["suites"]["heldout"]["champion"]["exact_match"] == result.champion["exact_match"]

    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(Path(artifact.path) / "adapter", adapter_only / "adapter")
    skipped = evaluate(section, ModelSection(), trained_lora, prepared_small, tmp_path / "2", Champion("test", "8", str(adapter_only)))
    assert skipped.champion is None and skipped.champion_info["evaluated"] is False
    assert skipped.champion_info["reason"] == f"production version 8 has no merged model ({adapter_only / 'model'}); not compared"


def test_evaluation_scores_base_and_candidate_on_the_same_rows(trained_lora, prepared_small, tmp_path):
    from evaluation.evaluate import evaluate

    schema = str(ROOT / "recipes" / "data" / "ticket_answer.schema.json")
    suite = {"metrics": ["exact_match", "token_f1", "json_valid", "json_schema", "json_field_accuracy", "eval_loss", "perplexity"],
             "json_schema": schema}
    result = evaluate(EvaluationSection(max_samples=16, suites=[suite]), ModelSection(), trained_lora, prepared_small, tmp_path)
    report = json.loads(Path(result.report_path).read_text())
    heldout = report["suites"]["heldout"]
    assert result.examples == {"heldout": 16} and len(heldout["per_example"]) == 16
    assert result.base["exact_match"] == 0.0 and result.base["json_valid"] == 0.0
    assert result.candidate["eval_loss"] < result.base["eval_loss"] / 3
    assert result.candidate["perplexity"] == pytest.approx(math.exp(result.candidate["eval_loss"]))
    first = heldout["per_example"][0]
    assert set(first) == {"index", "prompt", "reference", "base_output", "candidate_output", "base_scores", "candidate_scores", "outcome"}
    assert result.candidate["exact_match"] == sum(e["candidate_scores"]["exact_match"] for e in heldout["per_example"]) / 16
    assert sum(result.outcomes["heldout"].values()) == 16
    assert result.outcomes["heldout"]["win"] == sum(e["outcome"] == "win" for e in heldout["per_example"])
    assert result.candidate["json_schema"] <= result.candidate["json_valid"]


def test_an_extra_eval_file_is_its_own_suite_and_a_bad_row_names_the_file(trained_lora, prepared_small, tmp_path):
    from data_prep.readers import DataError
    from evaluation.evaluate import evaluate
    from tests.conftest import SAMPLE_HELDOUT, read_rows, write_jsonl

    rows = [{"prompt": r["messages"][1]["content"], "completion": r["messages"][2]["content"]} for r in read_rows(SAMPLE_HELDOUT, 6)]
    extra = write_jsonl(tmp_path / "extra.jsonl", rows)
    section = EvaluationSection(suites=[{"metrics": ["exact_match"]}, {"name": "extra", "sources": [{"path": str(extra)}],
                                                                         "metrics": ["exact_match", "rouge_l"]}], safety={"enabled": False})
    result = evaluate(section, ModelSection(), trained_lora, prepared_small, tmp_path / "eval")
    assert result.examples == {"heldout": 200 if prepared_small.eval_rows > 200 else prepared_small.eval_rows, "extra": 6}
    assert set(result.candidate) == {"exact_match", "extra.exact_match", "extra.rouge_l"}
    write_jsonl(extra, rows[:2] + [{"prompt": "no answer"}])
    with pytest.raises(DataError, match=r"evaluation suite 'extra': .*extra.jsonl row 3: unrecognised row format"):
        evaluate(section, ModelSection(), trained_lora, prepared_small, tmp_path / "eval2")


def test_artifact_has_every_file_vllm_and_lineage_need(artifact, trained_lora):
    root = Path(artifact.path)
    model = root / "model"
    for name in ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (model / name).is_file(), name
    assert sorted(p.name for p in (root / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == (model / "chat_template.jinja").read_text()
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("<|eot_id|>") in eos
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["base_model"]["model_id"] == "tiny:llama" and manifest["data"]["fingerprint"] == "f" * 64
    assert set(manifest["library_versions"]) >= {"torch", "transformers", "peft", "trl", "prefect"}
    assert manifest["files"]["model/model.safetensors"] and "manifest.json" not in manifest["files"]
    assert check_merged_model(model) == []
    assert (root / "README.md").read_text().startswith("---\nbase_model: tiny:llama\n")
    assert "vllm serve" in (root / "serve.sh").read_text() and (root / "serve.sh").stat().st_mode & 0o111


def test_merged_model_matches_the_adapter_model(artifact):
    equivalence = json.loads((Path(artifact.path) / "manifest.json").read_text())["merge"]["equivalence"]
    assert equivalence["passed"] and equivalence["greedy_match"]
    assert equivalence["max_abs_logit_diff"] <= equivalence["tolerance"] == 0.25
    assert equivalence["template_rows_checked"] == 16


def test_qlora_is_merged_into_the_16_bit_base(trained_qlora, prepared_small, tmp_path):
    from safetensors import safe_open

    assert trained_qlora.metrics["base_4bit_layers"] > 0
    result = export_artifact(ExportSection(), ModelSection(base="tiny:qwen2"), trained_qlora, prepared_small.eval_path, LINEAGE, tmp_path)
    model = Path(result.path) / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in config
    with safe_open(model / "model.safetensors", framework="pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
        assert not any("absmax" in k or "quant" in k for k in f.keys())
    assert dtypes == {"torch.bfloat16"}
    assert result.manifest["merge"]["equivalence"]["passed"]
    assert vllm_refusals(result.path) == []  # qwen2 + QLoRA, as vLLM's own code loads it (where a vLLM environment is given)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("quantization", "config.json: quantization_config is left in; vLLM would try to load quantized weights"),
        ("architecture", "config.json: architectures ['GPT2LMHeadModel'] is not one vLLM serves for our families"),
        ("template", "chat_template.jinja: missing; vLLM has no fallback template for these families"),
        ("shard", "model.safetensors: named in the index but missing"),
        ("consolidated", "consolidated.safetensors: a consolidated*.safetensors file switches vLLM to Mistral's format; remove it"),
        ("eos", "generation_config.json: eos_token_id [0] does not include the end-of-turn token '<|eot_id|>'"),
    ],
)
def test_broken_artifacts_are_caught(artifact, tmp_path, breakage, expected):
    model = tmp_path / "model"
    shutil.copytree(Path(artifact.path) / "model", model)
    config = json.loads((model / "config.json").read_text())
    if breakage == "quantization":
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    if breakage == "architecture":
        config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    if breakage == "template":
        (model / "chat_template.jinja").unlink()
    if breakage == "shard":
        (model / "model.safetensors").unlink()
    if breakage == "consolidated":
        shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")
    if breakage == "eos":
        gen = json.loads((model / "generation_config.json").read_text())
        (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [0]}))
    assert any(p.startswith(expected) for p in check_merged_model(model)), check_merged_model(model)


def test_serving_template_different_from_training_is_caught(artifact, trained_lora):
    from transformers import AutoTokenizer

    sample = json.loads(Path(trained_lora.tokenized_sample_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(Path(artifact.path) / "model")
    assert check_template_matches_training(tokenizer, sample) == []
    tokenizer.chat_template = tokenizer.chat_template.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n")
    problems = check_template_matches_training(tokenizer, sample)
    assert len(problems) == len(sample)
    assert problems[0] == "sample example 0: the shipped tokenizer/chat template gives different token ids than training saw"
    original = AutoTokenizer.from_pretrained(Path(artifact.path) / "model").chat_template
    tokenizer.chat_template = original.replace("{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}", "")
    assert check_template_matches_training(tokenizer, sample)[0] == "sample example 0: the prompt a server builds differs from the prompt training used"
    tokenizer.chat_template = original.replace("'<|start_header_id|>assistant<|end_header_id|>", "'<|start_header_id|>model<|end_header_id|>")
    problem = check_template_matches_training(tokenizer, sample)[0]
    assert problem.startswith("sample example 0: the shipped chat template cannot render the rows training saw: message 2: the chat "
                              "template's generation prompt (ending ") and "model<|end_header_id|>\\n\\n') is not followed by this" in problem


def test_export_refuses_a_tokenizer_that_drifted_from_training(trained_lora, prepared_small, tmp_path):
    drifted = tmp_path / "adapter"
    shutil.copytree(trained_lora.adapter_path, drifted)
    config_path = drifted / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (Path(__file__).parent.parent / "training" / "templates" / "chatml.jinja").read_text()
    config_path.write_text(json.dumps(config))
    (drifted / "chat_template.jinja").unlink(missing_ok=True)
    from dataclasses import replace

    with pytest.raises(ExportError) as info:
        export_artifact(ExportSection(), ModelSection(), replace(trained_lora, adapter_path=str(drifted)), prepared_small.eval_path, LINEAGE, tmp_path / "out")
    assert "sample example 0: the shipped tokenizer/chat template gives different token ids than training saw" in str(info.value)
    assert not (tmp_path / "out" / "artifact").exists()
    assert not list((tmp_path / "out").glob(".artifact*"))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"r": 16, "modules_to_save": ["lm_head"]}, ["modules_to_save ['lm_head'] (full lm_head/embedding copies) is not served by vLLM LoRA"]),
        ({"r": 16, "use_dora": True}, ["DoRA adapters are not served by vLLM LoRA"]),
        ({"r": 16, "bias": "all"}, ["bias='all'; vLLM LoRA serves bias='none' only"]),
        ({"r": 1024}, ["rank 1024 is above vLLM's largest --max-lora-rank 512"]),
        ({"r": 16, "rank_pattern": {"q_proj": 1024}}, ["rank_pattern 1024 is above vLLM's largest --max-lora-rank 512"]),
        ({"r": 16, "lora_bias": True}, ["a trained LoRA bias (lora_bias) is not served by vLLM LoRA"]),
        ({"r": 16, "init_lora_weights": "pissa"}, ["init_lora_weights='pissa' changes the base model's weights when peft loads the "
                                                   "adapter; vLLM serves the adapter on the unchanged base (convert it to a plain LoRA with peft first)"]),
        ({"r": 16, "init_lora_weights": "gaussian", "layer_replication": [[0, 2]]}, ["layer_replication is not served by vLLM LoRA"]),
        ({"r": 64, "bias": "none", "modules_to_save": None}, []),
    ],
)
def test_adapter_servability(config, expected):
    assert check_adapter_servable(config) == expected


def test_lm_eval_harness_runs_a_local_task_on_the_base_and_the_merged_artifact(artifact, trained_lora, tmp_path):
    """A task from local JSONL (no hub), run by lm-evaluation-harness on both model folders."""
    from evaluation.benchmarks import run_lm_eval
    from recipes.schema import LmEvalSection
    from tests.conftest import SAMPLE_HELDOUT, read_rows, write_ticket_task

    write_ticket_task(tmp_path)
    system = read_rows(SAMPLE_HELDOUT, 1)[0]["messages"][0]["content"]
    section = LmEvalSection(tasks=["ftpipe_tickets"], include_path=str(tmp_path), batch_size=4, system_instruction=system)
    scores = run_lm_eval(section, {"base": trained_lora.base.path, "candidate": str(Path(artifact.path) / "model")}, tmp_path / "out")
    assert set(scores) == {"base", "candidate"} and set(scores["candidate"]["ftpipe_tickets"]) == {"exact_match"}
    assert scores["candidate"]["ftpipe_tickets"]["exact_match"] > scores["base"]["ftpipe_tickets"]["exact_match"] == 0.0
    written = json.loads((tmp_path / "out" / "lm_eval_candidate.json").read_text())
    assert written["results"]["ftpipe_tickets"]["sample_len"] == 6 and "samples" not in written
