"""Quantized exports (export.quantize): llm-compressor writes the merged model in compressed-tensors format, ftpipe scores
it against the 16-bit candidate before the gates, ships it beside the 16-bit model, and vLLM's own code loads it."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from evaluation.gates import decide
from recipes.loader import RecipeError, recipe_from_dict
from recipes.schema import Gate
from tests.conftest import QUANTIZE_PYTHON, ROOT, VLLM_PYTHON, quantize_required, run_ftpipe, vllm_required

QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
QUANTIZED_GATES = ("evaluation.gates=[{metric: quantized.exact_match, no_regression_vs: unquantized, tolerance: 0.02}, "
                   "{metric: quantized.token_agreement, min: 0.9}, {metric: exact_match, min: 0.9}]")


def _refusal(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    return "\n".join(info.value.lines)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"evaluation": {"gates": [{"metric": "quantized.exact_match", "min": 0.9}]}},
     "evaluation.gates[0].metric quantized.exact_match: measured on the quantized export; set export.quantize"),
    ({"export": {"quantize": "w4a16"}, "evaluation": {"gates": [{"metric": "exact_match", "min_delta_vs_unquantized": -0.02}]}},
     "unquantized compares the quantized export with the 16-bit candidate; the metric must be quantized.<metric> (got 'exact_match')"),
    ({"export": {"quantize": "w4a16"}, "evaluation": {"gates": [{"metric": "quantized.token_agreement", "min_delta_vs_base": 0}]}},
     "quantized.token_agreement: only the quantized model has it; bound it with min or max"),
    ({"export": {"quantize": "int3"}}, "export.quantize: Input should be 'none', 'fp8_dynamic' or 'w4a16'"),
    ({"evaluation": {"suites": [{"name": "heldout"}, {"name": "quantized", "sources": [{"path": "x.jsonl"}]}]}},
     "suites: 'quantized' names the quantized results; give the suite another name"),
    ({"export": {"quantize": "fp8_dynamic"}, "evaluation": {"suites": [{"name": "extra", "sources": [{"path": "x.jsonl"}]}]}},
     "export.quantize: the quantized model is scored on the 'heldout' suite; keep it in evaluation.suites"),
])
def test_quantization_settings_that_cannot_work_are_refused_at_validate(raw, expected):
    assert expected in _refusal(raw)


def test_a_quantized_export_without_llm_compressor_is_refused_before_any_work(tmp_path):
    result = run_ftpipe("run", QUICKSTART, "--set", "export.quantize=w4a16", "--output-dir", str(tmp_path), FTPIPE_QUANTIZE_PYTHON="")
    assert result.returncode == 2 and not any(tmp_path.iterdir())
    assert ("export.quantize: w4a16 needs llm-compressor's environment: make it with `ftpipe quantize-env .quantize` and set "
            "FTPIPE_QUANTIZE_PYTHON=.quantize/bin/python") in result.stderr


def test_quantized_gates_compare_with_the_16_bit_candidate_the_base_and_bounds():
    candidate = {"exact_match": 0.9, "eval_loss": 0.30, "quantized.exact_match": 0.86, "quantized.eval_loss": 0.34,
                 "quantized.token_agreement": 0.8}
    base = {"exact_match": 0.1, "eval_loss": 7.0}

    def passed(**gate) -> bool:
        return decide([Gate(**gate)], candidate, base).passed

    assert not passed(metric="quantized.exact_match", no_regression_vs="unquantized", tolerance=0.02)  # lost 0.04
    assert passed(metric="quantized.exact_match", no_regression_vs="unquantized", tolerance=0.05)
    assert not passed(metric="quantized.eval_loss", max_delta_vs_unquantized=0.03)  # loss rose by 0.04
    assert passed(metric="quantized.eval_loss", max_delta_vs_unquantized=0.05)
    assert passed(metric="quantized.exact_match", min_delta_vs_base=0.7) and not passed(metric="quantized.exact_match", min_delta_vs_base=0.8)
    assert not passed(metric="quantized.token_agreement", min=0.9) and passed(metric="quantized.token_agreement", min=0.8)
    result = decide([Gate(metric="quantized.exact_match", no_regression_vs="unquantized", tolerance=0.02)], candidate, base).results[0]
    assert result.describe() == "quantized.exact_match - unquantized = -0.0400 fails >= -0.02 (no regression)"
    unmeasured = decide([Gate(metric="quantized.exact_match", min=0.5)], {"exact_match": 0.9}, base).results[0]
    assert math.isnan(unmeasured.value) and not unmeasured.passed  # no quantized export scored: the gate cannot pass


def test_token_agreement_counts_equal_tokens_at_the_same_position():
    from serving.quantize import token_agreement
    from training.families import FAMILIES
    from training.tiny import train_tokenizer

    tokenizer = train_tokenizer(FAMILIES["llama"], ["the team is billing and the priority is low"] * 20)
    ids = {text: tokenizer.encode(text, add_special_tokens=False) for text in ("team billing", "team", "billing")}
    assert token_agreement(tokenizer, ["team billing", ""], ["team billing", ""]) == 1.0
    assert token_agreement(tokenizer, ["team billing"], ["team"]) == round(len(ids["team"]) / len(ids["team billing"]), 4) < 1
    assert token_agreement(tokenizer, ["billing", "team"], ["team", "team"]) == 0.5


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """The quickstart with a w4a16 export, gated on what quantizing may cost."""
    quantize_required()
    out = tmp_path_factory.mktemp("quantized")
    result = run_ftpipe("run", QUICKSTART, "--set", "export.quantize=w4a16", "--set", "evaluation.max_samples=40", "--set", QUANTIZED_GATES,
                        "--output-dir", str(out), FTPIPE_QUANTIZE_PYTHON=QUANTIZE_PYTHON)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))


def test_a_w4a16_export_is_scored_gated_and_shipped_beside_the_16_bit_model(quantized_run):
    _, artifact = quantized_run
    manifest = json.loads((artifact / "manifest.json").read_text())
    quantized = manifest["quantized"]
    assert quantized["scheme"] == "w4a16" and quantized["format"] == "pack-quantized" and quantized["folder"] == "model-w4a16"
    assert quantized["llmcompressor"] == "0.14.0.1" and quantized["examples"] == 40
    assert quantized["weights_bytes"] < quantized["unquantized_weights_bytes"]
    candidate = manifest["evaluation"]["candidate"]
    assert quantized["delta"]["quantized.exact_match"] == pytest.approx(quantized["metrics"]["quantized.exact_match"] - candidate["exact_match"])
    assert quantized["metrics"]["quantized.exact_match"] >= 0.88 and quantized["metrics"]["quantized.token_agreement"] >= 0.9
    described = [r["description"] for r in manifest["gates"]["results"]]
    assert described[0].startswith("quantized.exact_match - unquantized = ") and described[0].endswith("passes >= -0.02 (no regression)")
    assert described[1].startswith("quantized.token_agreement = ")
    config = json.loads((artifact / "model-w4a16" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "lm_head" in config["ignore"]
    assert (artifact / "serve-w4a16.sh").read_text().endswith('exec vllm serve "$HERE/model-w4a16" --config "$HERE/vllm-w4a16.yaml" "$@"\n')
    assert "w4a16 quantized model: `./serve-w4a16.sh`" in (artifact / "README.md").read_text()
    assert run_ftpipe("check-artifact", str(artifact)).returncode == 0


def test_vllms_own_code_loads_the_quantized_export(quantized_run):
    vllm_required()
    _, artifact = quantized_run
    result = run_ftpipe("check-artifact", str(artifact), "--vllm-python", VLLM_PYTHON)
    assert result.returncode == 0, result.stdout
    from serving.vllm_env import check_with_vllm

    verdicts = {v["check"]: v for v in check_with_vllm(artifact, VLLM_PYTHON)}
    loaded = verdicts["vllm-w4a16.yaml: quantized weights through vLLM's quantization method (DefaultModelLoader.load_weights)"]
    assert loaded["ok"] and loaded["detail"].startswith("compressed-tensors: LlamaForCausalLM: all weights loaded")


def _drop_quantization(root: Path) -> None:
    path = root / "model-w4a16" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config))


def _another_format(root: Path) -> None:
    path = root / "model-w4a16" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["format"] = "float-quantized"
    path.write_text(json.dumps(config))


QUANTIZED_BREAKS = {
    "quantization config dropped": (_drop_quantization, [
        "model-w4a16/config.json: no compressed-tensors quantization_config; vLLM would load the w4a16 weights as 16-bit ones"]),
    "another scheme's format": (_another_format, [
        "model-w4a16/config.json: quantization_config format 'float-quantized' is not w4a16's 'pack-quantized'"]),
    "another chat template": (lambda root: (root / "model-w4a16" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}"), [
        "model-w4a16/chat_template.jinja: differs from model/chat_template.jinja; the quantized model must be served as the 16-bit one"]),
}


@pytest.mark.parametrize("breakage", QUANTIZED_BREAKS)
def test_a_broken_quantized_export_fails_the_check_with_its_checksums_recomputed(quantized_run, breakage, tmp_path):
    from tests.test_serving import _rechecksummed

    _, artifact = quantized_run
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("registered.json"))
    breaker, expected = QUANTIZED_BREAKS[breakage]
    breaker(copy)
    _rechecksummed(copy)
    result = run_ftpipe("check-artifact", str(copy))
    assert result.returncode == 1 and result.stdout.splitlines() == [*(f"FAIL {line}" for line in expected), f"{copy}: {len(expected)} problem(s)"]
    if breakage == "quantization config dropped" and VLLM_PYTHON:
        from serving.vllm_env import check_with_vllm

        refused = [v for v in check_with_vllm(copy, VLLM_PYTHON) if not v["ok"]]
        assert [v["check"] for v in refused] == [
            "vllm-w4a16.yaml: quantized weights through vLLM's quantization method (DefaultModelLoader.load_weights)"], refused


def test_a_gate_on_what_quantizing_costs_stops_the_run_before_export(quantized_run):
    """fp8_dynamic on the same trained adapter (training cached), with a bound no quantization meets: the gate named
    (exit 1, as any gate), nothing exported."""
    out, _ = quantized_run
    impossible = "evaluation.gates=[{metric: quantized.eval_loss, max_delta_vs_unquantized: -1.0}]"
    result = run_ftpipe("run", QUICKSTART, "--set", "export.quantize=fp8_dynamic", "--set", "evaluation.max_samples=40",
                        "--set", impossible, "--output-dir", str(out), FTPIPE_QUANTIZE_PYTHON=QUANTIZE_PYTHON)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 1 gates failed: quantized.eval_loss - unquantized = " in result.stderr
    [run_dir] = [p for p in out.glob("quickstart-*") if (p / "quantized" / "fp8_dynamic").is_dir()]
    config = json.loads((run_dir / "quantized" / "fp8_dynamic" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized" and not (run_dir / "artifact").exists()
    scored = json.loads((run_dir / "quantized" / "report.json").read_text())
    assert scored["scheme"] == "fp8_dynamic" and scored["metrics"]["quantized.eval_loss"] > -1.0


@pytest.mark.gpu
def test_vllm_serves_the_quantized_export_and_the_smoke_test_passes(quantized_run):
    """serve-w4a16.sh with a full vLLM environment on the GPU: vLLM's quantized kernels answer the task."""
    from tests.conftest import serve_with_vllm_and_smoke

    _, artifact = quantized_run
    serve_with_vllm_and_smoke(artifact, "serve-w4a16.sh", artifact.parent / "data" / "eval.jsonl")


def test_mixture_of_experts_routers_stay_16_bit_and_vllm_loads_the_quantized_experts(tmp_path):
    """Mixtral: llm-compressor leaves the routers out (vLLM loads them unquantized); vLLM's quantized MoE layers take
    the FP8 experts on CPU, and the W4A16 experts, whose kernels exist on GPUs only, are reported as left to a GPU
    machine instead of passed or failed."""
    from serving.export import ensure_index
    from serving.quantize import quantize_model
    from serving.vllm_env import CHECK_SCRIPT, run_tool_script
    from training.families import FAMILIES
    from training.tiny import build_tiny_model

    quantize_required()
    vllm_required()
    merged = tmp_path / "mixtral"
    build_tiny_model(FAMILIES["mixtral"], ["the team is billing and the priority is low"] * 50, merged)
    ensure_index(merged)
    verdicts = {}
    for scheme in ("fp8_dynamic", "w4a16"):
        quantized = tmp_path / scheme
        quantize_model(merged, quantized, scheme, QUANTIZE_PYTHON)
        config = json.loads((quantized / "config.json").read_text())["quantization_config"]
        assert sorted(config["ignore"]) == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
        (quantized / "vllm.yaml").write_text("dtype: bfloat16\nmax-model-len: 256\n")
        request = {"model": str(quantized), "adapter": None, "launch_files": {"vllm.yaml": str(quantized / "vllm.yaml")},
                   "models": {"vllm.yaml": str(quantized)}, "conversations": [], "stop_ids": []}
        answer = run_tool_script(VLLM_PYTHON, CHECK_SCRIPT, request, "vLLM's checks", "ftpipe vllm-env PATH", 600,
                                 env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""})
        verdicts[scheme] = answer["checks"][-1]
    assert verdicts["fp8_dynamic"]["ok"] and verdicts["fp8_dynamic"]["detail"] == "compressed-tensors: MixtralForCausalLM: all weights loaded"
    assert verdicts["w4a16"]["ok"] and verdicts["w4a16"]["skipped"]
    assert verdicts["w4a16"]["detail"].startswith("needs a GPU machine: vLLM on CPU says No WNA16 MoE backend")
