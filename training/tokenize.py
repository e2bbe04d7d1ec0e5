"""Chat rows -> token ids and labels, exactly as a server will see them, and the checks on the labels.

Each assistant turn is split at the point where a server starts generating: the text up to there is the
rendered prompt (`add_generation_prompt=True`), tokenized on its own exactly as an OpenAI-compatible
server tokenizes a request; the rest of the turn (content and end-of-turn token) is the completion,
the only part that carries a loss. Tokenizing the pieces separately keeps the training ids identical to
the serving ids, which tokenizing the whole conversation at once does not guarantee.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class MaskingError(ValueError):
    """Labels that would train the wrong thing (nothing, the prompt, or never the end-of-turn token)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        """Tokens before the final assistant turn's completion: what a server feeds before generating."""
        return max((i for i, label in enumerate(self.labels) if label == IGNORE), default=-1) + 1

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    """Token ids for the whole conversation; labels only on assistant turns (content + end-of-turn)."""
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # rendered text already tokenized
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        full_text = render(tokenizer, messages[: i + 1])
        if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
            raise MaskingError(
                "the chat template is not prefix-stable (rendering a conversation does not start with the rendering "
                "of its earlier turns), so assistant turns cannot be located; use a template without "
                "turn-dependent rewriting"
            )
        prompt_ids = ids_of(tokenizer, prompt_text[len(done):])
        completion_ids = ids_of(tokenizer, full_text[len(prompt_text):])
        input_ids += prompt_ids + completion_ids
        labels += [IGNORE] * len(prompt_ids) + completion_ids
        done = full_text
    return Encoded(input_ids, labels)


def final_turn_only(encoded: Encoded) -> Encoded:
    """The same ids with the loss on the last assistant turn only (earlier turns are context, as in a DPO prompt)."""
    start = encoded.prompt_length
    return Encoded(encoded.input_ids, [IGNORE] * start + encoded.labels[start:])


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain text for continued pre-training: every token carries a loss, and the end-of-text token closes it
    (so the model learns where documents end)."""
    input_ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(input_ids, list(input_ids))


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What a server feeds the model for this conversation minus its final assistant turn."""
    return ids_of(tokenizer, render(tokenizer, messages[:-1], add_generation_prompt=True))


def check_end_of_turn_trained(encoded: Encoded, end_of_turn_id: int, row: int) -> None:
    """The end-of-turn token must carry a loss, or the model never learns to stop."""
    if end_of_turn_id not in [label for label in encoded.labels if label != IGNORE]:
        raise MaskingError(
            f"row {row}: the end-of-turn token (id {end_of_turn_id}) has no label, so the model would never learn "
            "to stop; check that the chat template ends assistant turns with the tokenizer's eos and that pad != eos"
        )


def check_trained_fraction(trained: int, total: int, low: float, high: float, where: str) -> float:
    """Fail loudly when the share of tokens with a loss is implausible for chat SFT."""
    fraction = trained / total if total else 0.0
    if trained == 0:
        raise MaskingError(f"{where}: no token carries a loss (all labels are -100); assistant turns were not found")
    if fraction < low:
        raise MaskingError(
            f"{where}: only {fraction:.2%} of tokens carry a loss, below training.min_trained_token_fraction={low:g}"
        )
    if fraction > high:
        raise MaskingError(
            f"{where}: {fraction:.2%} of tokens carry a loss, above training.max_trained_token_fraction={high:g}; "
            "prompts are probably being trained on"
        )
    return fraction
