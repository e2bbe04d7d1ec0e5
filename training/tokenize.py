"""Chat rows -> token ids and labels, exactly as a server will see them, and the checks on the labels.

Each assistant turn is split at the point where a server starts generating: the text up to there is the
rendered prompt (`add_generation_prompt=True`), tokenized on its own exactly as an OpenAI-compatible
server tokenizes a request; the rest of the turn (content and end-of-turn token) is the completion,
the only part that carries a loss. Tokenizing the pieces separately keeps the training ids identical to
the serving ids, which tokenizing the whole conversation at once does not guarantee.

Real templates rewrite history (Qwen3 drops earlier reasoning, Mistral v0.3 moves the system prompt into
the last user turn, DeepSeek-R1 opens `<think>` in the generation prompt). A conversation such a template
renders differently at each step becomes one example per assistant turn, each rendered as a server renders
the conversation at that step; prefix-stable templates keep the one-pass encoding.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from data_prep.formats import THINK_CLOSE, THINK_OPEN, canonical_messages

IGNORE = -100
SENTINEL = "\ue000ftpipe-turn\ue001"  # a private-use marker no template rewrites


class MaskingError(ValueError):
    """Labels that would train the wrong thing (nothing, the prompt, or never the end-of-turn token)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turn: int | None = None  # index of the assistant message whose completion ends this example

    @property
    def prompt_length(self) -> int:
        """Tokens before the final assistant turn's completion: what a server feeds before generating."""
        return max((i for i, label in enumerate(self.labels) if label == IGNORE), default=-1) + 1

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass(frozen=True)
class RenderSettings:
    """What a template may read besides the messages: a fixed date (templates that print today's date would
    otherwise tokenize differently on another day) and the recipe's chat_template_kwargs (enable_thinking)."""

    date: str | None = None  # YYYY-MM-DD
    kwargs: tuple[tuple[str, object], ...] = ()

    def template_kwargs(self) -> dict:
        out = dict(self.kwargs)
        if self.date:
            day = datetime.date.fromisoformat(self.date)
            out["strftime_now"] = day.strftime  # transformers' strftime_now, pinned to the recorded day
        return out

    def to_dict(self) -> dict:
        return {"date": self.date, "chat_template_kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "RenderSettings":
        data = data or {}
        return cls(date=data.get("date"), kwargs=tuple(sorted((data.get("chat_template_kwargs") or {}).items())))


def settings_of(tokenizer) -> RenderSettings:
    return getattr(tokenizer, "ftpipe_render", None) or RenderSettings()


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **settings_of(tokenizer).template_kwargs())


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reasoning_mode(tokenizer) -> str:
    """How this template carries assistant reasoning: `template` (it renders reasoning_content, Qwen3), `forced`
    (its generation prompt opens `<think>` and the model writes the reasoning, DeepSeek-R1) or `inline` (it
    knows no reasoning, so the reasoning is written into the content as `<think>...</think>`)."""
    cached = getattr(tokenizer, "_ftpipe_reasoning_mode", None)
    if cached:
        return cached
    user = [{"role": "user", "content": "q"}]
    probe = user + [{"role": "assistant", "content": "a", "reasoning_content": SENTINEL}]
    if render(tokenizer, user, add_generation_prompt=True).rstrip().endswith(THINK_OPEN):
        mode = "forced"
    elif SENTINEL in render(tokenizer, probe):
        mode = "template"
    else:
        mode = "inline"
    tokenizer._ftpipe_reasoning_mode = mode
    return mode


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """Canonical messages, with reasoning folded into the content where the template knows no reasoning."""
    messages = canonical_messages(messages)
    if reasoning_mode(tokenizer) != "inline" or not any(m.get("reasoning_content") for m in messages):
        return messages
    return [{**{k: v for k, v in m.items() if k != "reasoning_content"},
             "content": f"{THINK_OPEN}\n{m['reasoning_content']}\n{THINK_CLOSE}\n\n{m['content']}"}
            if m.get("reasoning_content") else m for m in messages]


class _NotPrefixStable(Exception):
    pass


def encode_conversation(tokenizer, messages: list[dict]) -> list[Encoded]:
    """Examples for a conversation: one, labelled on every assistant turn, when the template renders each step as
    an extension of the previous one; otherwise one per assistant turn, as a server renders that step."""
    return _encode(tokenizer, messages)[1]


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    """The conversation as one example when the template allows, else the example of its final assistant turn."""
    return encode_conversation(tokenizer, messages)[-1]


def template_mode(tokenizer, messages: list[dict]) -> str:
    """`one-pass` or `per-turn`: how this template must encode this conversation."""
    return _encode(tokenizer, messages)[0]


def _encode(tokenizer, messages: list[dict]) -> tuple[str, list[Encoded]]:
    messages = template_messages(tokenizer, messages)
    try:
        return "one-pass", [_one_pass(tokenizer, messages)]
    except _NotPrefixStable:
        return "per-turn", [encode_turn(tokenizer, messages, i) for i, m in enumerate(messages) if m["role"] == "assistant"]


def _one_pass(tokenizer, messages: list[dict]) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # rendered text already tokenized
    last = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        full_text = render(tokenizer, messages[: i + 1])
        if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
            raise _NotPrefixStable
        prompt_ids = ids_of(tokenizer, prompt_text[len(done):])
        completion_ids = ids_of(tokenizer, full_text[len(prompt_text):])
        input_ids += prompt_ids + completion_ids
        labels += [IGNORE] * len(prompt_ids) + completion_ids
        done, last = full_text, i
    return Encoded(input_ids, labels, last)


def encode_turn(tokenizer, messages: list[dict], turn: int) -> Encoded:
    """The example of one assistant turn: the server's prompt for the conversation before it, then the turn's
    completion (what the model must generate after that prompt, end-of-turn included)."""
    prompt_text = render(tokenizer, messages[:turn], add_generation_prompt=True)
    full_text = render(tokenizer, messages[: turn + 1])
    if full_text.startswith(prompt_text):
        completion = full_text[len(prompt_text):]
    else:
        completion = _completion_after_rewrite(tokenizer, messages, turn, prompt_text, full_text)
    prompt_ids = ids_of(tokenizer, prompt_text)
    completion_ids = ids_of(tokenizer, completion)
    return Encoded(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids, turn)


def _completion_after_rewrite(tokenizer, messages: list[dict], turn: int, prompt_text: str, full_text: str) -> str:
    """The turn's completion when the template shows earlier turns differently once the turn is added. The prompt's
    tail, from the last message before the turn onwards, is found in the full rendering just before the turn's
    content; what follows it there is the completion. When the prompt goes on past that point with `<think>`
    (a template that opens reasoning for the model), the completion is the reasoning, `</think>`, then the turn."""
    probe = render(tokenizer, messages[:turn] + [{**messages[turn], "content": SENTINEL}])
    before_content = probe[: probe.find(SENTINEL)] if SENTINEL in probe else ""
    anchor = (messages[turn - 1].get("content") or "").strip() if turn else ""
    start = prompt_text.rfind(anchor) if anchor else -1
    if start < 0 or not full_text.startswith(before_content):
        raise MaskingError(_unlocatable(turn, prompt_text))
    tail = prompt_text[start:]
    for end in range(len(tail), len(anchor) - 1, -1):
        found = before_content.rfind(tail[:end])
        if found < 0:
            continue
        opened = tail[end:]
        if not opened:
            return full_text[found + end:]
        if opened.strip() == THINK_OPEN:
            reasoning = (messages[turn].get("reasoning_content") or "").strip("\n")
            return f"{reasoning}\n{THINK_CLOSE}\n\n" + full_text[found + end:]
        break
    raise MaskingError(_unlocatable(turn, prompt_text))


def _unlocatable(turn: int, prompt_text: str) -> str:
    return (f"message {turn}: the chat template's generation prompt (ending {prompt_text[-40:]!r}) is not followed by this "
            "assistant turn in any rendering of the conversation, so ftpipe cannot tell what the model should generate")


def final_turn_only(encoded: Encoded) -> Encoded:
    """The same ids with the loss on the last assistant turn only (earlier turns are context, as in a DPO prompt)."""
    start = encoded.prompt_length
    return Encoded(encoded.input_ids, [IGNORE] * start + encoded.labels[start:], encoded.turn)


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain text for continued pre-training: every token carries a loss, and the end-of-text token closes it
    (so the model learns where documents end)."""
    input_ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(input_ids, list(input_ids))


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What a server feeds the model for this conversation minus its final assistant turn."""
    return ids_of(tokenizer, render(tokenizer, template_messages(tokenizer, messages)[:-1], add_generation_prompt=True))


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


_PROBE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer.", "reasoning_content": "First reasoning."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer.", "reasoning_content": "Second reasoning."},
]


def describe_template(tokenizer) -> list[str]:
    """What this chat template does to a conversation, found by rendering probe conversations (single-turn, and
    multi-turn with a system prompt and reasoning): how ftpipe must encode them and what the template rewrites."""
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in _PROBE]
    single = template_mode(tokenizer, plain[:3])
    multi = template_mode(tokenizer, plain)
    reasoning = template_mode(tokenizer, _PROBE)
    lines = [f"chat template: single-turn rows {single}, multi-turn rows {multi}, rows with reasoning {reasoning} "
             "(per-turn: each assistant turn is its own example, rendered as a server renders that step)"]
    later = render(tokenizer, plain[:4], add_generation_prompt=True)
    if later.find(plain[0]["content"]) > later.find(plain[1]["content"]):
        lines.append("chat template: moves the system prompt into the last user turn")
    elif plain[0]["content"] not in render(tokenizer, plain[:3]):
        lines.append("chat template: drops the system prompt once the conversation ends with an assistant turn")
    mode = reasoning_mode(tokenizer)
    if mode == "forced":
        lines.append(f"chat template: its generation prompt opens {THINK_OPEN}; the model writes the reasoning, then {THINK_CLOSE}, "
                     "then the answer (reasoning is cut from earlier turns)")
    elif mode == "template" and "First reasoning." not in render(tokenizer, _PROBE[:4], add_generation_prompt=True):
        lines.append("chat template: renders reasoning_content, and drops the reasoning of turns before the last user message")
    elif mode == "inline":
        lines.append(f"chat template: knows no reasoning; rows' reasoning is trained inside the answer as {THINK_OPEN}...{THINK_CLOSE}")
    if _reads_date(tokenizer):
        lines.append(f"chat template: prints today's date; rendered with {settings_of(tokenizer).date or 'the run start date'} "
                     "(model.template_date), so a rerun tokenizes the same")
    return lines


def _reads_date(tokenizer) -> bool:
    renders = {tokenizer.apply_chat_template(_PROBE[1:3], tokenize=False, strftime_now=datetime.date(year, 1, 2).strftime)
               for year in (2001, 2002)}
    return len(renders) > 1
