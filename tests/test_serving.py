"""What the platform team receives: `ftpipe check-artifact`, the vLLM launch files and Kubernetes manifest, the model card,
and `ftpipe smoke` against a real OpenAI-compatible server (`transformers serve`) serving the exported artifact on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import VLLM_PYTHON, run_ftpipe, vllm_required


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


def _rechecksummed(root: Path) -> None:
    """The manifest's checksums made to match the files again, as a bug in export itself would leave them: only the
    check that knows what vLLM refuses can then find the break."""
    from data_prep.files import checksums
    from serving.registry import MARKER

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {name: digest for name, digest in checksums(root).items() if name not in ("manifest.json", MARKER)}
    (root / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_yaml(path: Path, **changes) -> None:
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))


def _edit_weights(model_dir: Path, rename: dict[str, str | None]) -> None:
    """Rename (or, to None, drop) tensors in the shard and its index, as a faulty export would write them."""
    from safetensors.torch import load_file, save_file

    shard = model_dir / "model.safetensors"
    tensors = {rename.get(name, name): tensor for name, tensor in load_file(shard).items() if rename.get(name, name)}
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"] = {rename.get(name, name): file for name, file in index["weight_map"].items() if rename.get(name, name)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


VLLM_REFUSES = {  # what vLLM 0.33 refused when loading each of these (issue 19): the project's own line, and vLLM's words
    "adapter rank above the launch file's max-lora-rank": (lambda root: _edit_json(root / "adapter" / "adapter_config.json", r=32), [
        "adapter/adapter_config.json: rank 32 is above the launch file's --max-lora-rank 16"], "LoRA rank 32 is greater than max_lora_rank 16"),
    "modules_to_save lm_head and embed_tokens": (lambda root: _edit_json(root / "adapter" / "adapter_config.json",
                                                                         modules_to_save=["lm_head", "embed_tokens"]), [
        "adapter/adapter_config.json: modules_to_save ['lm_head', 'embed_tokens'] (full lm_head/embedding copies) is not served by vLLM LoRA"],
        "Unsupported modules_to_save: ['lm_head', 'embed_tokens']"),
    "init_lora_weights pissa": (lambda root: _edit_json(root / "adapter" / "adapter_config.json", init_lora_weights="pissa"), [
        "adapter/adapter_config.json: init_lora_weights='pissa' changes the base model's weights when peft loads the adapter; vLLM "
        "serves the adapter on the unchanged base (convert it to a plain LoRA with peft first)"], "does not support init_lora_weights='pissa'"),
    "trained LoRA bias": (lambda root: _edit_json(root / "adapter" / "adapter_config.json", lora_bias=True), [
        "adapter/adapter_config.json: a trained LoRA bias (lora_bias) is not served by vLLM LoRA"], "vLLM does not support LoRA bias"),
    "DoRA": (lambda root: _edit_json(root / "adapter" / "adapter_config.json", use_dora=True), [
        "adapter/adapter_config.json: DoRA adapters are not served by vLLM LoRA"], "vLLM does not yet support DoRA"),
    "rank_pattern above the launch file's max-lora-rank": (
        lambda root: _edit_json(root / "adapter" / "adapter_config.json", rank_pattern={"q_proj": 32}), [
            "adapter/adapter_config.json: rank_pattern 32 is above the launch file's --max-lora-rank 16"],
        "LoRA rank 32 is greater than max_lora_rank 16"),
    "misspelt launch option": (lambda root: _edit_yaml(root / "vllm.yaml", **{"gpu-memory-utilisation": 0.9}), [
        "vllm.yaml: 'gpu-memory-utilisation' is not a `vllm serve` option (vLLM 0.33.0); did you mean 'gpu-memory-utilization'?"],
        "unrecognized arguments: --gpu-memory-utilisation"),
    "max-model-len above the model's context": (lambda root: _edit_yaml(root / "vllm-lora.yaml", **{"max-model-len": 4096}), [
        "vllm-lora.yaml: max-model-len 4096 is above the model's context of 2048 tokens (max_position_embeddings and rope scaling in "
        "config.json); vLLM refuses it"], "User-specified max_model_len (4096) is greater than the derived max_model_len"),
    "missing weight": (lambda root: _edit_weights(root / "model", {"model.norm.weight": None}), [
        "model/model.safetensors.index.json: weight model.norm.weight (shape [128]) is missing"],
        "Following weights were not initialized from checkpoint: {'model.norm.weight'}"),
    "renamed weight": (lambda root: _edit_weights(root / "model", {"model.layers.1.mlp.up_proj.weight": "model.layers.1.mlp.upper_proj.weight"}), [
        "model/model.safetensors.index.json: weight model.layers.1.mlp.up_proj.weight (shape [256, 128]) is missing",
        "model/model.safetensors.index.json: weight model.layers.1.mlp.upper_proj.weight is not one ['LlamaForCausalLM'] has"],
        "There is no module or parameter named 'layers.1.mlp.upper_proj'"),
    "weight of the wrong shape": (lambda root: _edit_weights(root / "model", {"model.layers.0.mlp.down_proj.weight": None}) or
                                  _add_weight(root / "model", "model.layers.0.mlp.down_proj.weight", (128, 64)), [
        "model/model.layers.0.mlp.down_proj.weight: shape [128, 64] where the architecture has [128, 256]"], "exceeds dimension size (64)"),
}


def _add_weight(model_dir: Path, name: str, shape: tuple[int, ...]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shard = model_dir / "model.safetensors"
    save_file({**load_file(shard), name: torch.zeros(shape, dtype=torch.bfloat16)}, shard, metadata={"format": "pt"})
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "model.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("breakage", list(VLLM_REFUSES))
def test_what_vllm_refuses_is_found_even_with_the_checksums_recomputed(artifact_copy, breakage):
    breaker, expected, _ = VLLM_REFUSES[breakage]
    breaker(artifact_copy)
    _rechecksummed(artifact_copy)
    code, lines = check(artifact_copy)
    assert code == 1 and lines == [*(f"FAIL {line}" for line in expected), f"{artifact_copy}: {len(expected)} problem(s)"]


def test_vllms_own_code_passes_the_artifact(artifact):
    """vLLM 0.33's parser, engine config, tokenizer, renderer, generation config, model class and weight loader, and its
    LoRA loader, on the artifact's folders: what `vllm serve` does up to the engine."""
    vllm_required()
    result = run_ftpipe("check-artifact", artifact.path, "--vllm-python", VLLM_PYTHON)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("launch files; vLLM's own code: 9 checks)")


@pytest.mark.parametrize("breakage", list(VLLM_REFUSES))
def test_vllm_itself_refuses_each_break_and_check_artifact_says_so(artifact_copy, breakage):
    from serving.vllm_env import check_with_vllm

    vllm_required()
    breaker, _, refusal = VLLM_REFUSES[breakage]
    breaker(artifact_copy)
    _rechecksummed(artifact_copy)
    refused = [v for v in check_with_vllm(artifact_copy, VLLM_PYTHON) if not v["ok"]]
    assert refused and all(refusal in v["detail"] for v in refused), refused


def test_the_launch_file_options_are_vllms_own(tmp_path):
    """serving/vllm_serve_options.json is what the vLLM environment's `vllm serve` parser takes (regenerate it with
    `python -m serving.vllm_env --options` when the pinned vLLM changes)."""
    from serving.vllm_env import serve_options

    vllm_required()
    known = json.loads((Path(__file__).parent.parent / "serving" / "vllm_serve_options.json").read_text())
    assert serve_options(VLLM_PYTHON) == {"vllm": known["vllm"], "options": known["options"]}


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


def test_a_checking_vllm_environment_leaves_out_the_gpu_kernels_and_takes_ftpipes_torch():
    from serving.vllm_env import wanted_requirements

    required = ["regex", "torch==2.14.0", "torchvision==0.29.0", "flashinfer-python==0.7.2.post1", "nvidia-cutlass-dsl[cu13]==4.8.0",
                "PyNvVideoCodec==2.0.4", "fastapi[standard]<0.137.0,>=0.133.0", "compressed-tensors==0.17.0"]
    assert wanted_requirements(required, False, "2.14.1") == ["regex", "fastapi[standard]<0.137.0,>=0.133.0", "compressed-tensors==0.17.0",
                                                               "torch==2.14.1"]
    assert wanted_requirements(required, True, "pinned") == required
