"""The export stage: merge the adapter into the unquantized base, check it, and write the vLLM-ready artifact.

Everything is written into a staging folder and renamed to `artifact/` only after every check passed,
so a folder named `artifact` is always complete.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.formats import conversation_of
from data_prep.files import sha256_file, atomic_write_json, atomic_write_text, checksums
from data_prep.prepare import read_jsonl
from recipes.schema import ExportSection, ModelSection, parse_size
from serving.assets import write_serving_assets
from serving.cards import model_card
from serving.checks import ADAPTER_FILES, check_adapter_servable, check_artifact, check_checksums, check_merged_model, check_template_matches_training
from training.models import load_saved_tokenizer, save_render_settings
from training.tokenize import prompt_ids
from training.train import TrainResult

log = logging.getLogger(__name__)

# Largest |logit difference| accepted between the shipped weights and the adapter model, per export dtype.
# bf16 keeps 8 bits of mantissa, so logits of magnitude ~10 move by ~0.05-0.1 from rounding alone.
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}
# A mixture-of-experts router picks its top-k experts: where two router scores nearly tie, 16-bit rounding can pick
# another expert and move that position's logits far past the tolerance. The merge itself is checked exactly (float32
# logits, then every saved tensor against the merged one), so the 16-bit model is judged by how many positions agree.
MOE_MIN_AGREEMENT = 0.9


class ExportError(RuntimeError):
    """The artifact failed a check; nothing was published."""


@dataclass
class ArtifactResult:
    path: str
    manifest: dict

    def to_dict(self) -> dict:
        return {"path": self.path, "manifest_path": str(Path(self.path) / "manifest.json")}

    def integrity_problems(self) -> list[str]:
        """Files changed since export (a zeroed shard, an edited card): a cached export like that is made again."""
        manifest = Path(self.path) / "manifest.json"
        if not manifest.is_file():
            return [f"{manifest}: missing"]
        try:
            listed = json.loads(manifest.read_text()).get("files") or {}
        except ValueError:
            return [f"{manifest}: not JSON"]
        return check_checksums(Path(self.path), listed)


CANARY_FILE = "canary.jsonl"  # evaluation.monitor reads it


def export_artifact(
    section: ExportSection,
    model_section: ModelSection,
    trained: TrainResult,
    eval_path: str,
    lineage: dict,
    out_dir: str | Path,
    canary: list[dict] = (),
) -> ArtifactResult:
    """Write out_dir/artifact: model/ (merged), adapter/, manifest.json, README.md, the vLLM launch files, k8s/ and
    the canary suite production is monitored with (canary.jsonl, when given)."""
    out_dir = Path(out_dir)
    final = out_dir / "artifact"
    staging = out_dir / f".artifact.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer = load_saved_tokenizer(trained.adapter_path)
        prompts = [prompt_ids(tokenizer, conversation_of(row)) for row in read_jsonl(eval_path)[: section.check_prompts]]
        equivalence = None
        if section.merged:
            equivalence = _write_merged(section, model_section, trained, tokenizer, prompts, staging / "model")
        adapter_problems = _write_adapter(section, trained, staging / "adapter")
        manifest = _manifest(section, trained, lineage, equivalence, adapter_problems)
        if quantized := quantized_summary(lineage["evaluation"]):
            shutil.copytree(lineage["evaluation"]["quantization"]["path"], staging / quantized["folder"])
            manifest["quantized"] = quantized
        manifest["serving"]["files"] = write_serving_assets(staging, manifest)
        atomic_write_text(staging / "README.md", model_card(manifest))
        if canary:
            atomic_write_text(staging / CANARY_FILE, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in canary))
        manifest["files"] = checksums(staging)
        atomic_write_json(staging / "manifest.json", manifest)
        if problems := check_artifact(staging):  # what `ftpipe check-artifact` would say of the published folder
            raise ExportError("artifact check failed:\n- " + "\n- ".join(problems))
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("artifact written to %s", final)
    return ArtifactResult(path=str(final), manifest=manifest)


def _write_merged(section: ExportSection, model_section: ModelSection, trained: TrainResult, tokenizer, prompts, model_dir: Path) -> dict:
    """Merge in float32 into the base loaded without quantization, save in the export dtype, reload and compare."""
    import torch
    from peft import PeftModel

    from evaluation.generate import load_model

    base = load_model(trained.base.path, trained.base.revision, dtype="float32", trust_remote_code=model_section.trust_remote_code,
                      tokenizer=tokenizer)
    adapted = PeftModel.from_pretrained(base, trained.adapter_path).eval()
    reference = _greedy_reference(adapted, tokenizer, prompts)
    merged = adapted.merge_and_unload()
    float32_merge = _compare(reference, merged, "float32")  # the merge itself, before any rounding
    merged.to(getattr(torch, section.dtype))
    merged_weights = weight_digests(merged, section.dtype)
    save_merged(merged, trained, tokenizer, model_dir, section.max_shard_size)
    del base, adapted, merged  # one float32 copy at a time: the reload below would otherwise double the peak memory
    gc.collect()

    problems = check_merged_model(model_dir)
    sample = json.loads(Path(trained.tokenized_sample_path).read_text())
    problems += check_template_matches_training(load_saved_tokenizer(model_dir), sample)
    shipped = load_model(str(model_dir), dtype="float32")
    saved_weights = weight_digests(shipped, section.dtype)
    changed = sorted(name for name, digest in merged_weights.items() if saved_weights.get(name) != digest)
    equivalence = judge_equivalence(float32_merge, _compare(reference, shipped, section.dtype), bool(trained.base.family.expert_parameters),
                                    changed)
    del shipped
    problems += equivalence_problems(equivalence)
    if problems:
        raise ExportError("export checks failed:\n- " + "\n- ".join(problems))
    equivalence["template_rows_checked"] = len(sample)
    return equivalence


def save_merged(merged, trained: TrainResult, tokenizer, model_dir: Path, max_shard_size: str) -> None:
    """The merged model as vLLM loads it: the family's architecture, no quantization config left from a QLoRA base,
    generation stopping at the end of turn, an index, the tokenizer with its template and render settings."""
    merged.config.architectures = [trained.base.family.architecture]
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.generation_config.eos_token_id = _stop_ids(tokenizer, merged)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(model_dir, max_shard_size=parse_size(max_shard_size))
    ensure_index(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_render_settings(tokenizer, model_dir)
    _ensure_chat_template_files(model_dir, tokenizer.chat_template)


def _stop_ids(tokenizer, model) -> list[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))


def merge_adapter(export: ExportSection, model_section: ModelSection, trained, merged_dir: Path) -> None:
    """The adapter merged into the float32 base and saved in export.dtype with the training tokenizer, as export ships
    it: what the quantized export and the served evaluation start from."""
    import torch
    from peft import PeftModel

    from evaluation.generate import load_model

    tokenizer = load_saved_tokenizer(trained.adapter_path)
    base = load_model(trained.base.path, trained.base.revision, dtype="float32", trust_remote_code=model_section.trust_remote_code,
                      tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, trained.adapter_path).merge_and_unload().to(getattr(torch, export.dtype))
    shutil.rmtree(merged_dir, ignore_errors=True)
    save_merged(merged, trained, tokenizer, merged_dir, export.max_shard_size)


def ensure_index(model_dir: Path) -> None:
    """A single-shard save has no index; vLLM and our checks expect one naming every shard."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file() or not single.is_file():
        return
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        weight_map = {name: single.name for name in f.keys()}
    atomic_write_json(index, {"metadata": {"total_size": single.stat().st_size}, "weight_map": weight_map})


def _ensure_chat_template_files(model_dir: Path, template: str) -> None:
    """Ship the template both as chat_template.jinja and in tokenizer_config.json."""
    atomic_write_text(model_dir / "chat_template.jinja", template)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    atomic_write_json(config_path, config)


def _greedy_reference(model, tokenizer, prompts: list[list[int]]) -> list[dict]:
    """The adapter model's greedy continuation of each prompt, and its logits over prompt + continuation."""
    import torch

    references = []
    for ids in prompts:
        tensor = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            greedy = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=32, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0].tolist()
        references.append({"tokens": greedy, "prompt_length": len(ids), "logits": _logits(model, greedy)})
    return references


def _logits(model, tokens: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens], device=model.device)).logits[0].float().cpu()


def _compare(reference: list[dict], shipped_model, dtype: str) -> dict:
    """Teacher-forced on the adapter model's greedy tokens: the largest logit difference, the share of positions whose
    logits all stay within tolerance, and whether each greedy token is still the top choice up to that tolerance
    (exact argmax flips on near-ties are reported too)."""
    tolerance = LOGIT_TOLERANCE[dtype]
    diff, exact = 0.0, True
    positions = agreeing = greedy_positions = greedy_kept = 0
    for ref in reference:
        shipped = _logits(shipped_model, ref["tokens"])
        per_position = (ref["logits"] - shipped).abs().amax(dim=-1)
        diff = max(diff, float(per_position.max()))
        positions += per_position.numel()
        agreeing += int((per_position <= tolerance).sum())
        for position in range(ref["prompt_length"] - 1, len(ref["tokens"]) - 1):
            chosen = ref["tokens"][position + 1]
            greedy_positions += 1
            greedy_kept += bool(shipped[position, chosen] >= shipped[position].max() - tolerance)
            exact &= int(shipped[position].argmax()) == chosen
    return {"prompts": len(reference), "dtype": dtype, "max_abs_logit_diff": diff, "tolerance": tolerance,
            "positions_within_tolerance": round(agreeing / positions, 4) if positions else 1.0,
            "greedy_match": greedy_kept == greedy_positions,
            "greedy_kept": round(greedy_kept / greedy_positions, 4) if greedy_positions else 1.0, "greedy_exact_argmax": exact}


def judge_equivalence(float32_merge: dict, shipped: dict, mixture_of_experts: bool, changed_weights: list[str]) -> dict:
    """Whether the shipped model is the adapter model. The float32 merge must match tightly everywhere and every saved
    tensor must be the merged tensor in the export dtype: those catch any real mismatch. A dense model's 16-bit logits
    must then stay within tolerance everywhere; a mixture-of-experts model's at MOE_MIN_AGREEMENT of positions,
    since a router near-tie may pick another expert after rounding."""
    exact_merge = float32_merge["max_abs_logit_diff"] <= float32_merge["tolerance"] and float32_merge["greedy_match"]
    if mixture_of_experts:
        rounding_ok = shipped["positions_within_tolerance"] >= MOE_MIN_AGREEMENT and shipped["greedy_kept"] >= MOE_MIN_AGREEMENT
    else:
        rounding_ok = shipped["max_abs_logit_diff"] <= shipped["tolerance"] and shipped["greedy_match"]
    return {**shipped, "float32_merge": {"max_abs_logit_diff": float32_merge["max_abs_logit_diff"], "tolerance": float32_merge["tolerance"],
                                         "passed": exact_merge},
            "weights_match_merge": not changed_weights, "changed_weights": changed_weights[:10],
            "mixture_of_experts": mixture_of_experts, "min_agreement": MOE_MIN_AGREEMENT if mixture_of_experts else 1.0,
            "passed": exact_merge and not changed_weights and rounding_ok}


def equivalence_problems(equivalence: dict) -> list[str]:
    """Why the shipped model is not the adapter model, one line per reason."""
    problems = []
    merge = equivalence["float32_merge"]
    if not merge["passed"]:
        problems.append(f"the float32 merge differs from the adapter model: max |logit diff| {merge['max_abs_logit_diff']:.4g} "
                        f"(tolerance {merge['tolerance']:g})")
    if equivalence["changed_weights"]:
        problems.append(f"saved weights differ from the merged weights: {', '.join(equivalence['changed_weights'])}")
    if merge["passed"] and not equivalence["changed_weights"] and not equivalence["passed"]:
        problems.append(
            f"merged model differs from the adapter model: max |logit diff| {equivalence['max_abs_logit_diff']:.4g} "
            f"(tolerance {equivalence['tolerance']:g}), positions within tolerance {equivalence['positions_within_tolerance']:.2%}, "
            f"greedy tokens kept within tolerance: {equivalence['greedy_kept']:.2%}"
            + (f" (a mixture-of-experts model needs {MOE_MIN_AGREEMENT:.0%})" if equivalence["mixture_of_experts"] else ""))
    return problems


def weight_digests(model, dtype: str) -> dict[str, str]:
    """sha256 of each tensor's bytes in the export dtype: what was merged must be exactly what was saved."""
    import hashlib

    import torch

    state = model.state_dict()
    out = {}
    for name, value in state.items():
        tensor = value.detach().to(getattr(torch, dtype)).contiguous().cpu().reshape(-1)
        out[name] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _write_adapter(section: ExportSection, trained: TrainResult, adapter_dir: Path) -> list[str]:
    """Copy the peft adapter and say whether vLLM's LoRA serving would take it."""
    source = Path(trained.adapter_path)
    config = json.loads((source / "adapter_config.json").read_text())
    problems = check_adapter_servable(config)
    if section.adapter:
        adapter_dir.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, adapter_dir / name)
    return problems


def _manifest(section: ExportSection, trained: TrainResult, lineage: dict, equivalence: dict | None, adapter_problems: list[str]) -> dict:
    adapter_config = json.loads((Path(trained.adapter_path) / "adapter_config.json").read_text())
    return {
        "format": "ftpipe-artifact/1",
        "name": lineage["name"],
        "run_started_at": lineage.get("run_started_at"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe_hash": lineage["recipe_hash"],
        "recipe": lineage["recipe"],
        "base_model": {**trained.base.to_dict(), "architecture": trained.base.family.architecture,
                       "license": base_license(trained.base.path, trained.base.revision)},
        "data": lineage["data"],
        "training": trained.metrics,
        "adapter": {"r": adapter_config["r"], "lora_alpha": adapter_config["lora_alpha"],
                    "target_modules": sorted(adapter_config["target_modules"]), "peft_type": adapter_config.get("peft_type"),
                    "vllm_servable": not adapter_problems, "vllm_problems": adapter_problems, "included": section.adapter},
        "merge": {"included": section.merged, "method": "peft merge_and_unload in float32 into the unquantized base",
                  "dtype": section.dtype, "equivalence": equivalence},
        "evaluation": lineage["evaluation"],
        "gates": lineage["gates"],
        "serving": {"max_model_len": section.max_model_len or lineage["max_seq_length"], "dtype": section.dtype,
                    "tensor_parallel_size": section.tensor_parallel_size, "gpu_memory_utilization": section.gpu_memory_utilization,
                    "vllm_image": section.vllm_image},
        "library_versions": library_versions(),
    }


def quantized_summary(evaluation: dict) -> dict | None:
    """The manifest's record of the quantized export (export.quantize): how it was made, where it is, and its scores
    and deltas against the 16-bit candidate."""
    info = evaluation.get("quantization")
    if not info:
        return None
    return {**{k: v for k, v in info.items() if k != "path"}, "folder": f"model-{info['scheme']}", "metrics": evaluation["quantized"]}


def record_in_manifest(artifact_path: str | Path, key: str, value) -> dict:
    """Add what comes before registration (benchmarks, cost) to manifest.json and the model card, and re-checksum
    the card alone (never the other files: a file changed since export must keep failing its checksum). Each file is
    replaced atomically."""
    root = Path(artifact_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest[key] = value
    atomic_write_text(root / "README.md", model_card(manifest))
    manifest["files"]["README.md"] = sha256_file(root / "README.md")
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def base_license(path: str, revision: str | None) -> str | None:
    """The `license` of the base model's card (README.md metadata), so the artifact's card carries it."""
    card = Path(path) / "README.md"
    if not Path(path).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(path, "README.md", revision=revision))
        except Exception as exc:  # offline, gated, or no card: the model card says the license is not known
            log.warning("could not read the base model's card for its license: %s", exc)
            return None
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        metadata = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    found = metadata.get("license") if isinstance(metadata, dict) else None
    return str(found) if found else None


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ftpipe", "torch", "transformers", "peft", "trl", "unsloth", "bitsandbytes", "datasets", "prefect", "wandb"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _publish(staging: Path, final: Path) -> None:
    """Swap the staging folder into place; an older artifact is moved aside first, then removed."""
    old = final.with_name(f".artifact.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
