"""What a platform team runs to serve the artifact with vLLM, built from the manifest alone.

- `vllm.yaml` + `serve.sh`: the merged model (`vllm serve model/ --config vllm.yaml`).
- `vllm-lora.yaml` + `serve-lora.sh`: the base model with the adapter (`--enable-lora --lora-modules`), only when
  vLLM's LoRA serving takes the adapter (the manifest says why not otherwise).
- `vllm-<scheme>.yaml` + `serve-<scheme>.sh`: the quantized export model-<scheme>/ (export.quantize), under the same
  served name; vLLM reads its compressed-tensors config.
- `k8s/vllm.yaml`: a Deployment and a Service running the `vllm/vllm-openai` image on the merged model, read from a
  volume that holds the artifact.

vLLM reads `--config` YAML files keyed by the long option names; the command line wins over the file.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from data_prep.files import atomic_write_text
from serving.checks import vllm_max_lora_rank

PORT = 8000
MODELS_MOUNT = "/models"  # where the Kubernetes volume holding artifacts is mounted


def write_serving_assets(folder: Path, manifest: dict) -> list[str]:
    """Write the launch files into the artifact folder; returns their names."""
    files = {"vllm.yaml": _yaml(merged_config(manifest)), "serve.sh": _script(manifest, lora=False),
             "k8s/vllm.yaml": kubernetes_manifest(manifest)}
    if manifest.get("quantized"):
        scheme = manifest["quantized"]["scheme"]
        files |= {f"vllm-{scheme}.yaml": _yaml(merged_config(manifest)), f"serve-{scheme}.sh": _script(manifest, lora=False, quantized=scheme)}
    if lora_servable(manifest):
        files |= {"vllm-lora.yaml": _yaml(lora_config(manifest)), "serve-lora.sh": _script(manifest, lora=True)}
    for name, text in files.items():
        atomic_write_text(folder / name, text)
        if name.endswith(".sh"):
            (folder / name).chmod(0o755)
    return sorted(files)


def lora_servable(manifest: dict) -> bool:
    return manifest["adapter"]["vllm_servable"] and manifest["adapter"]["included"]


# vLLM's reasoning parser for a template that renders reasoning itself (Qwen3) or opens <think> for the model (R1)
REASONING_PARSERS = {"template": "qwen3", "forced": "deepseek_r1"}


def merged_config(manifest: dict) -> dict:
    serving = manifest["serving"]
    config = {
        "served-model-name": manifest["name"],
        "dtype": serving["dtype"],
        "max-model-len": serving["max_model_len"],
        "tensor-parallel-size": serving["tensor_parallel_size"],
        "gpu-memory-utilization": serving["gpu_memory_utilization"],
        "generation-config": "auto",  # generation_config.json's eos ids, the chat template's end-of-turn among them
        "port": PORT,
    }
    return config | chat_options(manifest.get("training", {}).get("chat_template"))


def chat_options(chat: dict | None) -> dict:
    """Serve with what training rendered: the recipe's chat_template_kwargs as the server's defaults, and a reasoning
    parser that returns reasoning apart from the answer, as evaluation scored it."""
    if not chat:
        return {}
    options = {}
    if chat.get("chat_template_kwargs"):
        options["default-chat-template-kwargs"] = json.dumps(chat["chat_template_kwargs"], sort_keys=True)
    if chat.get("reasoning") in REASONING_PARSERS:
        options["reasoning-parser"] = REASONING_PARSERS[chat["reasoning"]]
    return options


def lora_config(manifest: dict) -> dict:
    """The base model under its own id, the adapter under the artifact's name."""
    base = manifest["base_model"]
    config = {**merged_config(manifest), "served-model-name": base["model_id"], "enable-lora": True,
              "max-lora-rank": vllm_max_lora_rank(manifest["adapter"]["r"]), "max-loras": 1}
    if base.get("revision"):
        config["revision"] = base["revision"]
    return config


def _script(manifest: dict, lora: bool, quantized: str | None = None) -> str:
    name = manifest["name"]
    if quantized:
        what = f"the {quantized} quantized model as \"{name}\""
        command = f'exec vllm serve "$HERE/model-{quantized}" --config "$HERE/vllm-{quantized}.yaml" "$@"'
    elif lora:
        what = f"the base model with the LoRA adapter; request model \"{name}\" for the adapter"
        command = (f"exec vllm serve {shlex.quote(manifest['base_model']['path'])} --config \"$HERE/vllm-lora.yaml\" "
                   f"--lora-modules {shlex.quote(name)}=\"$HERE/adapter\" \"$@\"")
    else:
        what = f"the merged model as \"{name}\""
        command = 'exec vllm serve "$HERE/model" --config "$HERE/vllm.yaml" "$@"'
    return f"""#!/usr/bin/env bash
# Serve {what} with vLLM's OpenAI-compatible server on port {PORT}. Extra arguments are passed on (and win over the config).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
{command}
"""


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def kubernetes_name(name: str) -> str:
    """A DNS-1123 label from the recipe name (which may hold '.' and '_')."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:53] or "model"


def kubernetes_manifest(manifest: dict) -> str:
    """Deployment + Service for the merged model. The artifact folder is expected at /models/<name> on the volume
    (a PersistentVolumeClaim named <name>-models); the start-up probe allows 20 minutes for loading weights."""
    name, serving = kubernetes_name(manifest["name"]), manifest["serving"]
    folder = f"{MODELS_MOUNT}/{name}"
    probe = {"httpGet": {"path": "/health", "port": PORT}}
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "vllm", "app.kubernetes.io/managed-by": "ftpipe"}
    container = {
        "name": "vllm",
        "image": serving["vllm_image"],
        "command": ["vllm", "serve"],
        "args": [f"{folder}/model", "--config", f"{folder}/vllm.yaml", "--host", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {"limits": {"nvidia.com/gpu": serving["tensor_parallel_size"]},
                      "requests": {"nvidia.com/gpu": serving["tensor_parallel_size"]}},
        "volumeMounts": [{"name": "models", "mountPath": folder, "subPath": name, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": {**probe, "periodSeconds": 5},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"ftpipe/recipe-hash": manifest["recipe_hash"], "ftpipe/base-model": manifest["base_model"]["model_id"]}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [container],
                "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models", "readOnly": True}},
                            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],  # NCCL and torch use /dev/shm
            }},
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
               "spec": {"selector": {"app.kubernetes.io/name": name}, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}
    header = (f"# vLLM serving {manifest['name']} (the merged model). Copy this artifact folder to /{name}/ on the volume behind the\n"
              f"# PersistentVolumeClaim {name}-models, then: kubectl apply -f k8s/vllm.yaml\n")
    return header + yaml.safe_dump_all([deployment, service], sort_keys=False)
