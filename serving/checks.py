"""Checks that an exported folder is what vLLM loads and what training saw.

Each check returns a list of problems (empty when fine), one sentence each, so the export can fail with
all of them at once and `ftpipe check-artifact` can print them.
"""
from __future__ import annotations

import difflib
import json
import struct
from pathlib import Path

import yaml

from jinja2 import TemplateError

from data_prep.files import sha256_file

from training.families import FAMILIES

from training.tokenize import MaskingError, encode_conversation, settings_of, template_messages

# Architectures vLLM serves for the families we train (vllm/model_executor/models/registry.py).
VLLM_ARCHITECTURES = {f.architecture for f in FAMILIES.values()}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The option names `vllm serve` takes (launch-file keys), read from vLLM's own parser; the file names its vLLM version.
VLLM_SERVE = json.loads((Path(__file__).with_name("vllm_serve_options.json")).read_text())
# compressed-tensors format of each export.quantize scheme (what llm-compressor writes and vLLM's loader expects).
QUANTIZED_FORMATS = {"fp8_dynamic": "float-quantized", "w4a16": "pack-quantized"}
# init_lora_weights values that only set the adapter's starting weights (PiSSA, OLoRA, CorDA, LoftQ change the base).
PLAIN_LORA_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# peft features that change what an adapter computes and that vLLM's LoRA does not implement.
UNSERVED_LORA_FEATURES = {"lora_bias": "a trained LoRA bias (lora_bias)", "alora_invocation_tokens": "Activated LoRA (aLoRA)",
                          "layer_replication": "layer_replication", "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA"}
# rope types whose factor extends the context beyond max_position_embeddings, as vLLM derives max-model-len.
EXTENDING_ROPE_TYPES = ("linear", "dynamic", "yarn")
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def check_artifact(root: Path) -> list[str]:
    """Everything `ftpipe check-artifact` verifies: the manifest's checksums, the merged model as vLLM loads it (files,
    architecture, dtype, shapes, tokenizer, chat template, stop tokens), the adapter and the launch files."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing; not an ftpipe artifact"]
    manifest = json.loads(manifest_path.read_text())
    problems = check_checksums(root, manifest.get("files") or {})
    if manifest.get("quantized"):
        problems += check_quantized_model(root, manifest["quantized"])
    if manifest["merge"]["included"]:
        model_dir = root / "model"
        problems += [f"model/{p}" for p in check_merged_model(model_dir)]
        problems += [f"model/{p}" for p in check_weights_dtype_and_shapes(model_dir, manifest["merge"]["dtype"])]
        problems += [f"model/{p}" for p in check_weight_names(model_dir)]
    if manifest["adapter"]["included"]:
        problems += [f"adapter/{name}: missing" for name in ADAPTER_FILES if not (root / "adapter" / name).is_file()]
    problems += [f"{name}: missing (launch file)" for name in manifest["serving"].get("files", []) if not (root / name).is_file()]
    problems += check_launch_files(root)
    return problems + registration_problems(root)


def registration_problems(root: Path) -> list[str]:
    """For a registry version folder (<registry>/<model>/<version>/ with registered.json): what changed since its
    registration, by the model's audit log (the manifest does not list itself, so its own checksums cannot tell)."""
    from governance.audit import AuditError
    from serving.registry import MARKER, Registry, RegistryError

    if not (root / MARKER).is_file():
        return []
    registry = Registry(root.resolve().parent.parent)
    try:
        return registry.version_problems(registry.version(root.resolve().parent.name, root.resolve().name))
    except (RegistryError, AuditError) as exc:
        return [f"registration: {exc}"]


def check_checksums(root: Path, expected: dict[str, str]) -> list[str]:
    """Every listed file is there with its SHA-256, and nothing unlisted was added (manifest.json lists all but itself)."""
    if not expected:
        return ["manifest.json: lists no files and checksums"]
    problems = []
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: listed in manifest.json but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: SHA-256 differs from manifest.json (changed after export, or corrupt)")
    from serving.registry import MARKER

    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"manifest.json", MARKER}
    problems += [f"{name}: not listed in manifest.json (added after export)" for name in sorted(present - set(expected))]
    return problems


def check_weights_dtype_and_shapes(model_dir: Path, dtype: str) -> list[str]:
    """Shards whole (safetensors header and size agree), tensors in the stated dtype, config dtype the same, and the
    embedding rows equal to config.vocab_size (vLLM sizes its embedding from the config)."""
    config_path, index_path = model_dir / "config.json", model_dir / "model.safetensors.index.json"
    if not config_path.is_file() or not index_path.is_file():
        return []  # reported by check_merged_model
    config = json.loads(config_path.read_text())
    problems = []
    stated = config.get("dtype") or config.get("torch_dtype")
    if stated != dtype:
        problems.append(f"config.json: dtype {stated!r} differs from the export dtype {dtype!r}")
    expected = SAFETENSORS_DTYPES[dtype]
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(json.loads(index_path.read_text()).get("weight_map", {}).values())):
        if not (model_dir / shard).is_file():
            continue  # reported by check_merged_model
        header, problem = read_safetensors_header(model_dir / shard)
        if problem:
            problems.append(f"{shard}: {problem}")
            continue
        wrong = sorted({t["dtype"] for t in header.values()} - {expected})
        if wrong:
            problems.append(f"{shard}: tensors in {', '.join(wrong)}, expected {expected} ({dtype})")
        shapes |= {name: t["shape"] for name, t in header.items()}
    embedding = next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)
    if embedding and embedding[0] != config.get("vocab_size"):
        problems.append(f"config.json: vocab_size {config.get('vocab_size')} differs from the embedding's {embedding[0]} rows")
    return problems


def read_safetensors_header(path: Path) -> tuple[dict, str | None]:
    """The tensor entries of a safetensors file's header, or why the file is not whole: the header states where
    every tensor's bytes end, so a truncated copy is caught without loading it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return {}, f"truncated: {size} bytes, not even a safetensors header"
        length = struct.unpack("<Q", raw)[0]
        if 8 + length > size:
            return {}, f"truncated: {size} bytes, the header alone needs {8 + length}"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return {}, "corrupt: the safetensors header is not JSON"
    header.pop("__metadata__", None)
    end = 8 + length + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size != end:
        return {}, f"truncated: {size} bytes, its header describes {end}" if size < end else f"{size - end} bytes past the last tensor"
    return header, None


def check_quantized_model(root: Path, quantized: dict) -> list[str]:
    """The quantized export (model-<scheme>/): a merged model whose config says the scheme's compressed-tensors format,
    served with the very tokenizer and chat template of model/."""
    folder = root / f"model-{quantized['scheme']}"
    problems = [f"{folder.name}/{p}" for p in check_merged_model(folder, quantized=quantized["scheme"])]
    model = root / "model"
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).is_file() and (folder / name).is_file() and sha256_file(model / name) != sha256_file(folder / name):
            problems.append(f"{folder.name}/{name}: differs from model/{name}; the quantized model must be served as the 16-bit one")
    return problems


def check_merged_model(model_dir: Path, quantized: str | None = None) -> list[str]:
    """config, weights, index, tokenizer, chat template and stop tokens of a merged model folder; quantized: the
    export.quantize scheme the folder must declare (else it must declare none)."""
    problems: list[str] = []
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return [f"{config_path}: missing"]
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in VLLM_ARCHITECTURES:
        problems.append(f"config.json: architectures {architectures} is not one vLLM serves for our families ({', '.join(sorted(VLLM_ARCHITECTURES))})")
    problems += _quantization_problems(config.get("quantization_config"), quantized)
    problems += _check_weights(model_dir)
    problems += _check_tokenizer_files(model_dir)
    problems += _check_stop_tokens(model_dir)
    return problems


def _quantization_problems(declared: dict | None, scheme: str | None) -> list[str]:
    if scheme is None:
        return ["config.json: quantization_config is left in; vLLM would try to load quantized weights"] if declared is not None else []
    expected = QUANTIZED_FORMATS[scheme]
    if not declared or declared.get("quant_method") != "compressed-tensors":
        return [f"config.json: no compressed-tensors quantization_config; vLLM would load the {scheme} weights as 16-bit ones"]
    if declared.get("format") != expected:
        return [f"config.json: quantization_config format {declared.get('format')!r} is not {scheme}'s {expected!r}"]
    return []


def _check_weights(model_dir: Path) -> list[str]:
    problems = [f"{p.name}: a consolidated*.safetensors file switches vLLM to Mistral's format; remove it"
                for p in model_dir.glob("consolidated*.safetensors")]
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        return problems + ["model.safetensors.index.json: missing"]
    shards = set(json.loads(index_path.read_text()).get("weight_map", {}).values())
    if not shards:
        problems.append("model.safetensors.index.json: weight_map is empty")
    problems += [f"{shard}: named in the index but missing" for shard in sorted(shards) if not (model_dir / shard).is_file()]
    return problems


def _check_tokenizer_files(model_dir: Path) -> list[str]:
    problems = []
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        problems.append("tokenizer: no tokenizer.json or tokenizer.model")
    if not (model_dir / "chat_template.jinja").is_file():
        problems.append("chat_template.jinja: missing; vLLM has no fallback template for these families")
    tok_config = model_dir / "tokenizer_config.json"
    if not tok_config.is_file() or not json.loads(tok_config.read_text()).get("chat_template"):
        problems.append("tokenizer_config.json: no chat_template field")
    return problems


def _check_stop_tokens(model_dir: Path) -> list[str]:
    gen_path = model_dir / "generation_config.json"
    tok_config = model_dir / "tokenizer_config.json"
    if not gen_path.is_file():
        return ["generation_config.json: missing; vLLM reads its eos_token_id as stop tokens"]
    if not tok_config.is_file() or not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return []  # reported by _check_tokenizer_files
    eos_token = json.loads(tok_config.read_text()).get("eos_token")
    from transformers import AutoTokenizer

    try:
        eos_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(eos_token) if eos_token else None
    except (OSError, ValueError, TypeError) as exc:
        return [f"tokenizer: does not load ({' '.join(str(exc).split())[:200]})"]
    configured = json.loads(gen_path.read_text()).get("eos_token_id")
    configured = configured if isinstance(configured, list) else [configured]
    if eos_id is not None and eos_id not in configured:
        return [f"generation_config.json: eos_token_id {configured} does not include the end-of-turn token {eos_token!r} (id {eos_id}); generations would not stop"]
    return []


def check_launch_files(root: Path) -> list[str]:
    """The launch files as `vllm serve --config` reads them: every key an option of the vLLM version the files are for,
    max-model-len within the model's context, and (vllm-lora.yaml) the adapter within --max-lora-rank."""
    problems = []
    for name, folder in launch_files(root).items():
        config_path = root / folder / "config.json"
        model_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        options = yaml.safe_load((root / name).read_text()) or {}
        problems += [f"{name}: {line}" for line in _unknown_options(options)]
        limit = model_length_limit(model_config)
        if limit and isinstance(options.get("max-model-len"), int) and options["max-model-len"] > limit:
            problems.append(f"{name}: max-model-len {options['max-model-len']} is above the model's context of {limit} tokens "
                            "(max_position_embeddings and rope scaling in config.json); vLLM refuses it")
        adapter_config = root / "adapter" / "adapter_config.json"
        if options.get("enable-lora") and adapter_config.is_file():
            rank_limit = options.get("max-lora-rank", 16)
            problems += [f"adapter/adapter_config.json: {p}" for p in check_adapter_servable(json.loads(adapter_config.read_text()), rank_limit)]
    return problems


def launch_files(root: Path) -> dict[str, str]:
    """The artifact's vLLM launch files and the model folder each serves: vllm.yaml and vllm-lora.yaml the merged
    model/ (vllm-lora.yaml with the adapter), vllm-<scheme>.yaml the quantized model-<scheme>/."""
    found = {}
    for path in sorted(root.glob("vllm*.yaml")):
        suffix = path.stem.removeprefix("vllm").removeprefix("-")
        found[path.name] = "model" if suffix in ("", "lora") else f"model-{suffix}"
    return found


def _unknown_options(options: dict) -> list[str]:
    known = set(VLLM_SERVE["options"])
    lines = []
    for key in options:
        if str(key) not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            lines.append(f"{key!r} is not a `vllm serve` option (vLLM {VLLM_SERVE['vllm']})" + (f"; did you mean {close[0]!r}?" if close else ""))
    return lines


def model_length_limit(config: dict) -> int | None:
    """The longest context vLLM derives from a config: max_position_embeddings, times the rope factor where the rope
    type extends it (yarn counts from original_max_position_embeddings)."""
    text = config.get("text_config", config)
    limit = text.get("max_position_embeddings")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type")
    if limit and kind in EXTENDING_ROPE_TYPES and rope.get("factor"):
        limit = int((rope.get("original_max_position_embeddings") or limit) * rope["factor"])
    return limit


def check_weight_names(model_dir: Path) -> list[str]:
    """Every weight the architecture needs is in the index, none it does not know, each in its shape: the model is
    built on the meta device from config.json (no memory, no hub code) and its state dict named as save_pretrained
    writes it (tied weights dropped, transformers' checkpoint conversions reverted)."""
    index_path, config_path = model_dir / "model.safetensors.index.json", model_dir / "config.json"
    if not index_path.is_file() or not config_path.is_file():
        return []  # reported by check_merged_model
    expected = expected_weights(config_path)
    if isinstance(expected, str):
        return [f"config.json: {expected}"]
    present = _weight_shapes(model_dir, json.loads(index_path.read_text()).get("weight_map", {}))
    problems = [f"model.safetensors.index.json: weight {name} (shape {list(shape)}) is missing" for name, shape in sorted(expected.items())
                if name not in present]
    problems += [f"model.safetensors.index.json: weight {name} is not one {json.loads(config_path.read_text()).get('architectures')} has"
                 for name in sorted(set(present) - set(expected))]
    problems += [f"{name}: shape {present[name]} where the architecture has {list(shape)}" for name, shape in sorted(expected.items())
                 if name in present and present[name] is not None and present[name] != list(shape)]
    return problems


def expected_weights(config_path: Path) -> dict[str, tuple] | str:
    """Checkpoint name -> shape of every weight a config's architecture saves, or why it cannot be built."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        return f"the architecture cannot be built from it ({' '.join(str(exc).split())[:200]})"
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _weight_shapes(model_dir: Path, weight_map: dict[str, str]) -> dict[str, list[int] | None]:
    """Each indexed weight's shape from its shard's header (None where the shard is unreadable: reported elsewhere)."""
    shapes: dict[str, list[int] | None] = dict.fromkeys(weight_map)
    for shard in sorted(set(weight_map.values())):
        if (model_dir / shard).is_file():
            header, problem = read_safetensors_header(model_dir / shard)
            if not problem:
                shapes |= {name: header[name]["shape"] for name in header if name in shapes}
    return shapes


def check_adapter_servable(adapter_config: dict, max_lora_rank: int = 512) -> list[str]:
    """Reasons vLLM's LoRA serving would refuse this adapter (empty when it would load it); max_lora_rank: the launch
    file's --max-lora-rank (512: the largest vLLM takes)."""
    problems = []
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']} (full lm_head/embedding copies) is not served by vLLM LoRA")
    if adapter_config.get("trainable_token_indices"):
        problems.append("trainable_token_indices (embeddings of tokens added for the chat template) are not served by vLLM LoRA")
    if adapter_config.get("use_dora"):
        problems.append("DoRA adapters are not served by vLLM LoRA")
    if adapter_config.get("target_parameters"):
        problems.append(
            f"target_parameters {sorted(adapter_config['target_parameters'])} (LoRA on fused mixture-of-experts weights): vLLM's LoRA "
            "loader reads peft's [experts, in, out] expert layout as [out, in] and refuses or drops it (vllm-project/vllm#52198); "
            "an adapter on lora.target_modules: attention is served")
    if adapter_config.get("bias", "none") != "none":
        problems.append(f"bias={adapter_config['bias']!r}; vLLM LoRA serves bias='none' only")
    problems += [f"{what} is not served by vLLM LoRA" for key, what in UNSERVED_LORA_FEATURES.items() if adapter_config.get(key)]
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_LORA_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base model's weights when peft loads the adapter; vLLM serves the "
                        "adapter on the unchanged base (convert it to a plain LoRA with peft first)")
    rank = max([adapter_config.get("r", 0), *(adapter_config.get("rank_pattern") or {}).values()])
    if rank > max_lora_rank:
        source = "rank_pattern" if rank != adapter_config.get("r", 0) else "rank"
        limit = "vLLM's largest --max-lora-rank" if max_lora_rank == VLLM_LORA_RANKS[-1] else "the launch file's --max-lora-rank"
        problems.append(f"{source} {rank} is above {limit} {max_lora_rank}")
    return problems


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that fits this rank."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def check_template_matches_training(tokenizer, sample: list[dict]) -> list[str]:
    """Render the rows training saw with the shipped tokenizer: token ids must be identical, example by example
    (a template that rewrites history gives one example per assistant turn), and the prompt a server builds
    (apply_chat_template with a generation prompt) must be the prefix training used."""
    problems = []
    for i, item in enumerate(sample):
        messages = item["messages"]
        try:
            encodings = {e.turn: e for e in encode_conversation(tokenizer, messages)}
        except (MaskingError, TemplateError) as exc:
            problems.append(f"sample example {i}: the shipped chat template cannot render the rows training saw: {exc}")
            continue
        turn = item.get("turn", max((t for t in encodings if t is not None), default=None))
        if turn not in encodings or encodings[turn].input_ids != item["input_ids"]:
            problems.append(f"sample example {i}: the shipped tokenizer/chat template gives different token ids than training saw")
            continue
        history = template_messages(tokenizer, messages)[:turn]
        server_prompt = list(tokenizer.apply_chat_template(history, tokenize=True, add_generation_prompt=True, return_dict=False,
                                                           **settings_of(tokenizer).template_kwargs()))
        if server_prompt != item["input_ids"][: item["prompt_length"]]:
            problems.append(f"sample example {i}: the prompt a server builds differs from the prompt training used")
    return problems
