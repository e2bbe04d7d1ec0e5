"""Local model folders as users bring them: a tiny random model of the family with the special tokens of the
real model's published tokenizer and its real chat template (tests/templates), saved where `model.base` can
point. Built once per test session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
LLAMA3_SPECIALS = ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>",
                   "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|vision_pad|>", "<|fim_pad|>")


@dataclass(frozen=True)
class RealModel:
    name: str
    family: str  # tiny:<family> architecture
    template: str
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...]
    unk: str | None = None
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)

    def chat_template(self) -> str:
        return (TEMPLATES / self.template).read_text(encoding="utf-8")


REAL_MODELS = {m.name: m for m in (
    RealModel("llama-3.1-instruct", "llama", "llama-3.1-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_SPECIALS),
    RealModel("llama-3.2-instruct", "llama", "llama-3.2-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3_SPECIALS),
    RealModel("qwen2.5-instruct", "qwen2", "qwen2.5-instruct.jinja", None, "<|im_end|>", "<|endoftext|>", QWEN_SPECIALS),
    RealModel("qwen3", "qwen3", "qwen3.jinja", None, "<|im_end|>", "<|endoftext|>", QWEN_SPECIALS, plain=("<think>", "</think>")),
    RealModel("mistral-v0.3-instruct", "mistral", "mistral-v0.3-instruct.jinja", "<s>", "</s>", None,
              ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]"), unk="<unk>"),
    RealModel("mistral-nemo-instruct", "mistral", "mistral-nemo-instruct.jinja", "<s>", "</s>", "<pad>", ("[INST]", "[/INST]"), unk="<unk>"),
    # Mistral v1's sentencepiece vocabulary has no [INST] token: the marker is text, spelled in pieces
    RealModel("mixtral-instruct", "mixtral", "mixtral-instruct.jinja", "<s>", "</s>", None, (), unk="<unk>"),
    # a Qwen vocabulary whose end-of-text became DeepSeek's end-of-sentence, also the pad
    RealModel("deepseek-r1-distill", "qwen2", "deepseek-r1-distill.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
              "<｜end▁of▁sentence｜>", ("<｜User｜>", "<｜Assistant｜>", "<|EOT|>", "<|vision_pad|>", "<|fim_pad|>", "<｜▁pad▁｜>"),
              plain=("<think>", "</think>")),
)}


def build_real_model(model: RealModel, corpus: list[str], folder: Path) -> Path:
    """The tiny model folder for a real model's tokenizer and template (built once; reused when present)."""
    from training.families import family_for
    from recipes.schema import TINY_MODEL_TYPES
    from training.tiny import bpe_tokenizer, save_tiny_model

    if (folder / "config.json").is_file():
        return folder
    tokenizer = bpe_tokenizer(corpus, list(model.specials), bos=model.bos, eos=model.eos, pad=model.pad, unk=model.unk, plain=model.plain)
    tokenizer.chat_template = model.chat_template()
    save_tiny_model(family_for(TINY_MODEL_TYPES[model.family]), tokenizer, folder)
    return folder


def multi_turn_rows(rows: list[dict], with_reasoning: bool = True) -> list[dict]:
    """Pairs of single-turn ticket rows joined into system + two user/assistant exchanges; every other conversation
    carries reasoning on its assistant turns (as `reasoning_content`, or `<think>` in the content)."""
    out = []
    for i in range(0, len(rows) - 1, 2):
        first, second = rows[i]["messages"], rows[i + 1]["messages"]
        conversation = [dict(m) for m in first[:3] + second[1:3]]
        if with_reasoning and i % 4 == 0:
            conversation[2]["reasoning_content"] = "The ticket names its team."
            conversation[4]["content"] = f"<think>\nThe second ticket too.\n</think>\n\n{conversation[4]['content']}"
        out.append({"messages": conversation})
    return out
