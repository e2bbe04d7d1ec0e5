"""The one registry of model families, keyed by the Hugging Face config's `model_type`.

Everything family-specific lives here: default chat template, special tokens, which token pads (never
the end-of-turn token, or its label would be masked and the model would never stop), LoRA target-module
presets and the architecture name vLLM serves.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the name vLLM's model registry serves
    config_class: str  # transformers config class, for tiny models
    template: str  # file in training/templates
    bos_token: str | None
    end_of_turn: str  # ends an assistant turn; the tokenizer's eos and a stop token for serving
    pad_candidates: tuple[str, ...]  # first one present in the vocabulary pads
    extra_special: tuple[str, ...]  # other special tokens the template uses
    lora_presets: dict[str, tuple[str, ...]]
    # a mixture-of-experts model's expert weights: 3-D parameters (one slice per expert), adapted through
    # peft's target_parameters rather than as linear modules
    expert_parameters: tuple[str, ...] = ()
    tiny_config: tuple[tuple[str, object], ...] = ()  # extra config values for the tiny model of this family

    @property
    def chat_template(self) -> str:
        return (TEMPLATES_DIR / self.template).read_text(encoding="utf-8")

    def target_modules(self, preset_or_names: str | list[str]) -> list[str]:
        return self.lora_targets(preset_or_names)[0]

    def lora_targets(self, preset_or_names: str | list[str]) -> tuple[list[str], list[str]]:
        """(module names, parameter names) a LoRA preset or an explicit list of module names adapts:
        all-linear on a mixture-of-experts model is attention plus the experts; experts is the experts alone."""
        if isinstance(preset_or_names, list):
            return preset_or_names, []
        if preset_or_names == "experts" or (preset_or_names == "all-linear" and self.expert_parameters):
            if not self.expert_parameters:
                raise UnsupportedFamilyError(f"lora.target_modules=experts: {self.model_type} has no expert layers (mixtral has)")
            modules = list(ATTENTION) if preset_or_names == "all-linear" else []
            return modules, list(self.expert_parameters)
        return list(self.lora_presets[preset_or_names]), []


_PRESETS = {"attention": ATTENTION, "all-linear": ATTENTION + MLP}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        model_type="llama",
        architecture="LlamaForCausalLM",
        config_class="LlamaConfig",
        template="llama3.jinja",
        bos_token="<|begin_of_text|>",
        end_of_turn="<|eot_id|>",
        pad_candidates=("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"),
        extra_special=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        lora_presets=_PRESETS,
    ),
    "mistral": Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        config_class="MistralConfig",
        template="mistral.jinja",
        bos_token="<s>",
        end_of_turn="</s>",
        pad_candidates=("<pad>", "<unk>"),
        extra_special=("<unk>", "[INST]", "[/INST]"),
        lora_presets=_PRESETS,
    ),
    "qwen2": Family(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        template="chatml.jinja",
        bos_token=None,
        end_of_turn="<|im_end|>",
        pad_candidates=("<|endoftext|>",),
        extra_special=("<|im_start|>",),
        lora_presets=_PRESETS,
    ),
}


# Qwen3 shares Qwen2's ChatML template and tokens; only the architecture differs.
FAMILIES["qwen3"] = replace(FAMILIES["qwen2"], model_type="qwen3", architecture="Qwen3ForCausalLM", config_class="Qwen3Config")
# Mixtral is Mistral's tokenizer and template with sparse mixture-of-experts MLPs.
FAMILIES["mixtral"] = replace(
    FAMILIES["mistral"], model_type="mixtral", architecture="MixtralForCausalLM", config_class="MixtralConfig",
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    tiny_config=(("num_local_experts", 4), ("num_experts_per_tok", 2)),
)


class UnsupportedFamilyError(ValueError):
    pass


def adapter_problems(family: Family, lora) -> list[str]:
    """What in a recipe's lora section this family's model cannot take (peft adapts expert weights, 3-D
    parameters, with a wrapper that has no DoRA and no dropout)."""
    try:
        _, parameters = family.lora_targets(lora.target_modules)
    except UnsupportedFamilyError as exc:
        return [f"training.lora.target_modules: {exc}"]
    problems = []
    if parameters and lora.use_dora:
        problems.append(f"training.lora.use_dora: peft cannot apply DoRA to {family.model_type}'s expert weights; "
                        "use lora.target_modules: attention, or use_dora: false")
    if parameters and lora.dropout:
        problems.append(f"training.lora.dropout: peft applies no dropout to {family.model_type}'s expert weights; use dropout: 0")
    return problems


def family_for(model_type: str) -> Family:
    """The family of a config's model_type, or a clear error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        ) from None
