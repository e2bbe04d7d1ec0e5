"""The one registry of model families, keyed by the Hugging Face config's `model_type`.

Everything family-specific lives here: default chat template, special tokens, which token pads (never
the end-of-turn token, or its label would be masked and the model would never stop), which template markers
the family's real tokenizers hold as one token, LoRA target-module presets and the architecture name vLLM serves.
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
    extra_special: tuple[str, ...]  # other special tokens of the family's tiny tokenizer
    # markers every real tokenizer of the family holds as one special token: added to a base that lacks them when
    # the template writes them (a marker some real tokenizers spell in pieces, Mistral v1's [INST], stays text)
    template_tokens: tuple[str, ...]
    attention: tuple[str, ...] = ATTENTION  # the attention projections (DeepSeek's MLA has its own)
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
            modules = list(self.attention) if preset_or_names == "all-linear" else []
            return modules, list(self.expert_parameters)
        return list(self.attention if preset_or_names == "attention" else self.attention + MLP), []

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
        template_tokens=("<|start_header_id|>", "<|end_header_id|>"),
    ),
    "mistral": Family(
        model_type="mistral",
        architecture="MistralForCausalLM",
        config_class="MistralConfig",
        template="mistral.jinja",
        bos_token="<s>",
        end_of_turn="</s>",
        pad_candidates=("<pad>", "<unk>"),
        extra_special=("<unk>", "[INST]", "[/INST]"),  # v3 tokenizers' control tokens; v1 (Mixtral) spells them in pieces
        template_tokens=(),
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
        template_tokens=("<|im_start|>",),
    ),
    # Llama 4's text model: every layer a mixture of experts (fused 3-D expert weights) beside a shared expert.
    "llama4_text": Family(
        model_type="llama4_text",
        architecture="Llama4ForCausalLM",
        config_class="Llama4TextConfig",
        template="llama4.jinja",
        bos_token="<|begin_of_text|>",
        end_of_turn="<|eot|>",
        pad_candidates=("<|finetune_right_pad|>",),
        extra_special=("<|end_of_text|>", "<|header_start|>", "<|header_end|>"),
        template_tokens=("<|header_start|>", "<|header_end|>"),
        expert_parameters=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
        tiny_config=(("num_local_experts", 4), ("num_experts_per_tok", 1), ("intermediate_size_mlp", 256), ("head_dim", 32)),
    ),
    # DeepSeek-V3 / R1: multi-head latent attention (low-rank q and kv projections) and routed experts.
    "deepseek_v3": Family(
        model_type="deepseek_v3",
        architecture="DeepseekV3ForCausalLM",
        config_class="DeepseekV3Config",
        template="deepseek_v3.jinja",
        bos_token="<｜begin▁of▁sentence｜>",
        end_of_turn="<｜end▁of▁sentence｜>",
        pad_candidates=("<｜▁pad▁｜>",),
        extra_special=("<｜User｜>", "<｜Assistant｜>"),
        template_tokens=("<｜User｜>", "<｜Assistant｜>"),
        attention=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        tiny_config=(("first_k_dense_replace", 1), ("n_routed_experts", 4), ("num_experts_per_tok", 2), ("n_group", 1),
                     ("topk_group", 1), ("moe_intermediate_size", 128), ("q_lora_rank", 64), ("kv_lora_rank", 32),
                     ("qk_rope_head_dim", 16), ("qk_nope_head_dim", 16), ("v_head_dim", 32), ("num_key_value_heads", 4),
                     # what transformers' DeepseekV3 computes (sigmoid scores, the e_score_correction_bias), said as the
                     # published config says it: without these keys vLLM builds a gate with no correction bias
                     ("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")),
    ),
}


# Qwen3 shares Qwen2's ChatML template and tokens; only the architecture differs.
FAMILIES["qwen3"] = replace(FAMILIES["qwen2"], model_type="qwen3", architecture="Qwen3ForCausalLM", config_class="Qwen3Config",
                            tiny_config=(("head_dim", 32),))
FAMILIES["qwen3_moe"] = replace(
    FAMILIES["qwen3"], model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", config_class="Qwen3MoeConfig",
    expert_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    tiny_config=(("head_dim", 32), ("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 128)),
)
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
