"""What the platform team receives: `ftpipe check-artifact`, the vLLM launch files and Kubernetes manifest, the model card,
and `ftpipe smoke` against a real OpenAI-compatible server (`transformers serve`) serving the exported artifact on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, run_ftpipe, wait_until_healthy


@pytest.fixture()
def artifact_copy(artifact, tmp_path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(artifact.path, target)
    return target


def check(path: Path) -> tuple[int, list[str]]:
    result = run_ftpipe("check-artifact", str(path))
    return result.returncode, result.stdout.splitlines()


def test_an_intact_artifact_passes_the_check(artifact):
    code, lines = check(Path(artifact.path))
    assert code == 0 and lines == [f"{artifact.path}: PASS (files and checksums, config, weights, tokenizer, chat template, stop tokens, "
                                   "adapter, launch files)"]


def _edit_config(root: Path, **changes) -> None:
    path = root / "model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


BREAKAGES = {
    "missing tokenizer": (lambda root: (root / "model" / "tokenizer.json").unlink(), [
        "FAIL model/tokenizer.json: listed in manifest.json but missing",
        "FAIL model/tokenizer: no tokenizer.json or tokenizer.model",
    ]),
    "quantization_config left in": (lambda root: _edit_config(root, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}), [
        "FAIL model/config.json: SHA-256 differs from manifest.json (changed after export, or corrupt)",
        "FAIL model/config.json: quantization_config is left in; vLLM would try to load quantized weights",
    ]),
    "wrong architecture": (lambda root: _edit_config(root, architectures=["GPT2LMHeadModel"]), [
        "FAIL model/config.json: SHA-256 differs from manifest.json (changed after export, or corrupt)",
        "FAIL model/config.json: architectures ['GPT2LMHeadModel'] is not one vLLM serves for our families (DeepseekV3ForCausalLM, "
        "Llama4ForCausalLM, LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
        "Qwen3MoeForCausalLM)",
    ]),
    "truncated shard": (lambda root: os.truncate(root / "model" / "model.safetensors", (root / "model" / "model.safetensors").stat().st_size - 1000), [
        "FAIL model/model.safetensors: SHA-256 differs from manifest.json (changed after export, or corrupt)",
        "FAIL model/model.safetensors: truncated: {size} bytes, its header describes {full}",
    ]),
    "checksum mismatch": (lambda root: (root / "adapter" / "adapter_config.json").write_text(
        (root / "adapter" / "adapter_config.json").read_text().replace('"r": 16', '"r": 8')), [
        "FAIL adapter/adapter_config.json: SHA-256 differs from manifest.json (changed after export, or corrupt)",
    ]),
    "file added": (lambda root: (root / "model" / "consolidated.safetensors").write_bytes(b"x"), [
        "FAIL model/consolidated.safetensors: not listed in manifest.json (added after export)",
        "FAIL model/consolidated.safetensors: a consolidated*.safetensors file switches vLLM to Mistral's format; remove it",
    ]),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_each_broken_artifact_gets_its_exact_message_and_exit_1(artifact_copy, breakage):
    full = (artifact_copy / "model" / "model.safetensors").stat().st_size
    breaker, expected = BREAKAGES[breakage]
    breaker(artifact_copy)
    code, lines = check(artifact_copy)
    expected = [line.format(size=full - 1000, full=full) for line in expected]
    assert code == 1 and lines == [*expected, f"{artifact_copy}: {len(expected)} problem(s)"]


def test_launch_files_serve_the_merged_model_and_the_adapter_from_the_recipe(artifact):
    root = Path(artifact.path)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["serving"]["files"] == ["k8s/vllm.yaml", "serve-lora.sh", "serve.sh", "vllm-lora.yaml", "vllm.yaml"]
    assert yaml.safe_load((root / "vllm.yaml").read_text()) == {
        "served-model-name": "test", "dtype": "bfloat16", "max-model-len": 256, "tensor-parallel-size": 1,
        "gpu-memory-utilization": 0.9, "generation-config": "auto", "port": 8000}
    lora = yaml.safe_load((root / "vllm-lora.yaml").read_text())
    assert (lora["enable-lora"], lora["max-lora-rank"], lora["max-loras"]) == (True, 16, 1)
    serve = (root / "serve.sh").read_text()
    assert 'exec vllm serve "$HERE/model" --config "$HERE/vllm.yaml" "$@"' in serve and (root / "serve.sh").stat().st_mode & 0o111
    assert "--lora-modules test=\"$HERE/adapter\"" in (root / "serve-lora.sh").read_text()
    for script in ("serve.sh", "serve-lora.sh"):
        assert subprocess.run(["bash", "-n", str(root / script)]).returncode == 0


def test_the_kubernetes_manifest_is_valid_for_the_cluster_api(artifact):
    """Validated against Kubernetes' own OpenAPI schemas (kubernetes-validate), strict: unknown fields are errors."""
    import kubernetes_validate

    documents = list(yaml.safe_load_all((Path(artifact.path) / "k8s" / "vllm.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service"]
    for document in documents:
        kubernetes_validate.validate(document, "1.37.0", strict=True)
    container = documents[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "vllm/vllm-openai:v0.33.0"
    assert container["args"] == ["/models/test/model", "--config", "/models/test/vllm.yaml", "--host", "0.0.0.0"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    volumes = {v["name"]: v for v in documents[0]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and volumes["models"]["persistentVolumeClaim"]["claimName"] == "test-models"
    broken = {**documents[1], "spec": {**documents[1]["spec"], "portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def test_the_model_card_carries_metadata_lineage_and_the_base_license(artifact, tmp_path):
    from serving.export import base_license

    card = (Path(artifact.path) / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---", 2)[1])
    assert metadata["base_model"] == "tiny:llama" and metadata["datasets"] == ["sha256:" + "f" * 64]
    assert metadata["license"] == "other" and metadata["base_model_relation"] == "finetune"
    assert metadata["model-index"][0]["results"][0]["metrics"] == [{"type": "exact_match", "value": 1.0}]
    for heading in ("## Intended use", "## Evaluation", "## Gates", "## Training", "## Merge", "## Safety", "## Serving (vLLM)",
                    "## Approval", "## Limitations", "## Recipe"):
        assert heading in card
    assert "License: the base model's card states none here" in card
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    assert base_license(str(tmp_path), None) == "apache-2.0"
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert base_license(str(tmp_path), None) is None


@pytest.fixture(scope="module")
def served_artifact(artifact):
    """`transformers serve` (OpenAI-compatible) on loopback, serving the merged model on CPU; stopped after the module."""
    model = str(Path(artifact.path) / "model")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host", "127.0.0.1", "--port",
                               str(port), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    wait_until_healthy(f"http://127.0.0.1:{port}/health", server, 180, "transformers serve")
    yield f"http://127.0.0.1:{port}/v1", model
    server.terminate()
    server.wait(timeout=30)


def test_smoke_gets_the_evaluated_answers_from_the_served_artifact(served_artifact, prepared_small, tmp_path):
    """The server applies the shipped chat template itself; its greedy answers must be the ones our own generation
    gives the merged model on the same prompts, so exact match agrees with evaluation."""
    from data_prep.formats import conversation_of
    from data_prep.prepare import read_jsonl
    from evaluation.generate import generate, load_model
    from transformers import AutoTokenizer

    url, model = served_artifact
    report_path = tmp_path / "smoke.json"
    result = run_ftpipe("smoke", "--base-url", url, "--model", model, "--suite", prepared_small.eval_path, "--limit", "8",
                        "--max-tokens", "32", "--report", str(report_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["requests"] == 8 and report["failed"] == 0
    conversations = [conversation_of(row) for row in read_jsonl(prepared_small.eval_path)[:8]]
    tokenizer = AutoTokenizer.from_pretrained(model)
    local = generate(load_model(model), tokenizer, conversations, max_new_tokens=32, batch_size=8)
    assert [e["answer"] for e in report["examples"]] == local
    expected = sum(a.strip() == c[-1]["content"].strip() for a, c in zip(local, conversations, strict=True)) / 8
    assert report["exact_match"] == expected
    assert report["latency_s"]["p50"] > 0 and report["latency_s"]["max"] >= report["latency_s"]["p95"] >= report["latency_s"]["p50"]
    lines = result.stdout.splitlines()
    assert lines[0] == f"smoke test of {model} at {url}: 8 requests, 0 failed"
    assert lines[1].startswith(f"exact match {expected:.4f}") and lines[2].startswith("latency p50 ")


def test_smoke_fails_on_refused_requests_and_on_too_low_exact_match(served_artifact, prepared_small):
    url, model = served_artifact
    wrong = run_ftpipe("smoke", "--base-url", url, "--model", "not-served", "--suite", prepared_small.eval_path, "--limit", "2")
    assert wrong.returncode == 1
    assert wrong.stdout.splitlines()[0] == f"smoke test of not-served at {url}: 2 requests, 2 failed"
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 requests failed; first: HTTP 400: ")
    strict = run_ftpipe("smoke", "--base-url", url, "--model", model, "--suite", prepared_small.eval_path, "--limit", "2",
                        "--max-tokens", "1", "--min-exact-match", "0.5")
    assert strict.returncode == 1 and strict.stderr.strip().splitlines()[-1] == "error: exact match 0.0000 is below --min-exact-match 0.5"
    bad = run_ftpipe("smoke", "--base-url", url, "--model", model, "--suite", "/nonexistent.jsonl")
    assert bad.returncode == 2 and "/nonexistent.jsonl" in bad.stderr
