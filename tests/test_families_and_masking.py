"""Family registry, golden chat-template renders, tiny models, and the loss-masking checks."""
from __future__ import annotations

import json

import pytest

from training.families import FAMILIES, UnsupportedFamilyError, family_for
from training.tokenize import IGNORE, Encoded, MaskingError, check_end_of_turn_trained, check_trained_fraction, encode_chat, prompt_ids

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]

GOLDEN = {
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "U1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
    "mistral": "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>",
    "qwen2": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
}
GOLDEN["qwen3"] = GOLDEN["qwen3_moe"] = GOLDEN["qwen2"]
GOLDEN["mixtral"] = GOLDEN["mistral"]
GOLDEN["llama4"] = ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nS<|eot|><|header_start|>user<|header_end|>\n\nU1<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\nA1<|eot|><|header_start|>user<|header_end|>\n\nU2<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\nA2<|eot|>")
GOLDEN["deepseek_v3"] = "<｜begin▁of▁sentence｜>S<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>U2<｜Assistant｜>A2<｜end▁of▁sentence｜>"
GENERATION_PROMPT = {"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n", "mistral": "", "mixtral": "", "qwen2": "<|im_start|>assistant\n",
                     "qwen3": "<|im_start|>assistant\n", "qwen3_moe": "<|im_start|>assistant\n",
                     "llama4": "<|header_start|>assistant<|header_end|>\n\n", "deepseek_v3": "<｜Assistant｜>"}
COMPLETION = {"llama": "A2<|eot_id|>", "mistral": "A2</s>", "mixtral": "A2</s>", "qwen2": "A2<|im_end|>\n", "qwen3": "A2<|im_end|>\n",
              "qwen3_moe": "A2<|im_end|>\n", "llama4": "A2<|eot|>", "deepseek_v3": "A2<｜end▁of▁sentence｜>"}


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(UnsupportedFamilyError) as info:
        family_for("gpt2")
    assert str(info.value) == "model_type 'gpt2' is not supported; supported families: deepseek_v3, llama, llama4_text, mistral, mixtral, qwen2, qwen3, qwen3_moe"


def test_registry_names_vllm_architectures_and_presets():
    assert {f.architecture for f in FAMILIES.values()} == {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                                                         "Qwen3ForCausalLM", "Llama4ForCausalLM", "DeepseekV3ForCausalLM",
                                                         "Qwen3MoeForCausalLM"}
    assert family_for("deepseek_v3").lora_targets("attention")[0] == ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    assert family_for("llama4_text").lora_targets("experts") == ([], ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])
    assert family_for("qwen3_moe").lora_targets("all-linear")[1] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert family_for("llama").target_modules("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(family_for("qwen2").target_modules("all-linear")) == 7
    assert family_for("mistral").target_modules(["q_proj"]) == ["q_proj"]
    assert family_for("mixtral").lora_targets("all-linear") == (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert family_for("mixtral").lora_targets("experts") == ([], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with pytest.raises(UnsupportedFamilyError, match="llama has no expert layers"):
        family_for("llama").lora_targets("experts")


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_chat_template_render(tokenizers, family):
    tokenizer = tokenizers[family]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == GOLDEN[family]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == GOLDEN[family][: -len(COMPLETION[family])]
    assert prompt.endswith(GENERATION_PROMPT[family])


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_tiny_models_pad_with_a_token_that_is_not_eos(tiny_refs, tokenizers, family):
    from transformers import AutoConfig

    from recipes.schema import TINY_MODEL_TYPES

    tokenizer = tokenizers[family]
    assert tokenizer.eos_token == family_for(TINY_MODEL_TYPES[family]).end_of_turn
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    config = AutoConfig.from_pretrained(tiny_refs[family].path)
    assert config.model_type == TINY_MODEL_TYPES[family] and config.num_hidden_layers == 2 and config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_labels_cover_only_assistant_turns_including_end_of_turn(tokenizers, family):
    tokenizer = tokenizers[family]
    encoded = encode_chat(tokenizer, CONVERSATION)
    assert encoded.input_ids == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    trained_text = tokenizer.decode([t for t in encoded.labels if t != IGNORE])
    assert trained_text == COMPLETION[family].replace("A2", "A1") + COMPLETION[family]
    check_end_of_turn_trained(encoded, tokenizer.eos_token_id, row=1)
    assert encoded.input_ids[: len(prompt_ids(tokenizer, CONVERSATION))] == prompt_ids(tokenizer, CONVERSATION)


def test_masked_end_of_turn_is_caught():
    encoded = Encoded(input_ids=[5, 6, 7, 2], labels=[IGNORE, 6, 7, IGNORE])
    with pytest.raises(MaskingError) as info:
        check_end_of_turn_trained(encoded, end_of_turn_id=2, row=7)
    assert str(info.value).startswith("row 7: the end-of-turn token (id 2) has no label, so the model would never learn to stop")


@pytest.mark.parametrize(
    ("trained", "total", "message"),
    [
        (0, 100, "batch 3: no token carries a loss (all labels are -100); assistant turns were not found"),
        (1, 1000, "batch 3: only 0.10% of tokens carry a loss, below training.min_trained_token_fraction=0.01"),
        (95, 100, "batch 3: 95.00% of tokens carry a loss, above training.max_trained_token_fraction=0.9; prompts are probably being trained on"),
    ],
)
def test_implausible_trained_fractions_fail_loudly(trained, total, message):
    with pytest.raises(MaskingError) as info:
        check_trained_fraction(trained, total, 0.01, 0.9, "batch 3")
    assert str(info.value) == message


def test_pad_equal_to_eos_collator_trap_is_caught(tokenizers, sample_rows):
    """A collator that masks pad ids hides eos from the loss when pad == eos; the pre-training check sees it."""
    from types import SimpleNamespace

    from recipes.schema import TrainingSection
    from training.sft import check_collated_batch
    from transformers import DataCollatorForLanguageModeling

    tokenizer = tokenizers["llama"]
    examples = [{"input_ids": encode_chat(tokenizer, r["messages"]).input_ids} for r in sample_rows[:4]]
    broken = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    broken.pad_token = broken.eos_token = tokenizer.eos_token
    trainer = SimpleNamespace(data_collator=DataCollatorForLanguageModeling(broken, mlm=False))
    with pytest.raises(MaskingError) as info:
        check_collated_batch(trainer, examples, tokenizer.eos_token_id, TrainingSection(batch_size=4))
    assert str(info.value).startswith(f"after collation, rows [0, 1, 2, 3] have no label on the end-of-turn token (id {tokenizer.eos_token_id})")


def test_tiny_model_cache_is_reused(corpus):
    from training.tiny import tiny_model_path

    first = tiny_model_path("qwen2", lambda: corpus)
    assert tiny_model_path("qwen2", lambda: corpus) == first
    assert json.loads((first / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert tiny_model_path("qwen2", lambda: corpus[:100]) != first
    keyed = tiny_model_path("qwen2", lambda: corpus, corpus_key="data-key")
    assert tiny_model_path("qwen2", lambda: pytest.fail("a keyed model is found without reading its corpus"), corpus_key="data-key") == keyed


def test_missing_end_of_turn_is_added_and_pad_takes_an_unused_special(corpus, tmp_path):
    """A base tokenizer without the family's end-of-turn and pad tokens: the end-of-turn token is added as one special
    token and its row is trained; the pad takes a special token the vocabulary has and the template does not use."""
    from dataclasses import replace

    from recipes.schema import ModelSection
    from training.backends import new_token_rows
    from training.models import BaseModelRef, load_tokenizer
    from training.tiny import train_tokenizer

    bare = replace(FAMILIES["llama"], end_of_turn="<|end_of_text|>", pad_candidates=("<|end_of_text|>",),
                   extra_special=("<|start_header_id|>", "<|end_header_id|>"))
    base_tokenizer = train_tokenizer(bare, corpus[:200])
    base_tokenizer.pad_token = None  # like Llama 3 base: no pad token at all
    base_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(BaseModelRef("base", None, str(tmp_path), "llama"), ModelSection(base=str(tmp_path)))
    eot, pad = tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert tokenizer.eos_token_id == eot and tokenizer.pad_token_id == pad and eot != pad
    assert tokenizer.ftpipe_added_ids == [eot]
    assert "<|finetune_right_pad_id|>" not in tokenizer.get_vocab()
    assert new_token_rows(tokenizer) == {"embed_tokens": [eot], "lm_head": [eot]}
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=True, return_dict=True)["input_ids"]
    assert rendered.count(eot) == 2  # one token per turn end, not spelled out
