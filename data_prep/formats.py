"""Normalise every supported row format into one canonical row, and validate it.

Canonical rows (what training reads):
- chat: `{"messages": [{"role", "content"}, ...]}`: optional system, then user/assistant alternating, ending
  with the assistant. chat, sharegpt, alpaca and completion rows all become this.
- text: `{"text": ...}` for continued pre-training.
- preference: `{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}` for DPO
  (trl's conversational preference format).
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system"}
KIND_OF_FORMAT = {"chat": "chat", "sharegpt": "chat", "alpaca": "chat", "completion": "chat", "text": "text", "preference": "preference"}

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


def detect_format(record: Any) -> str:
    """The format a row is in, from the keys it has."""
    if not isinstance(record, dict):
        raise RowError(f"row is a {type(record).__name__}, expected an object")
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    raise RowError(
        f"unrecognised row format (keys: {', '.join(sorted(map(str, record))) or 'none'}); expected messages, "
        "conversations, instruction/output, prompt/completion, prompt/chosen/rejected or text"
    )


def rename_columns(record: Any, columns: dict[str, str]) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    return {columns.get(key, key): value for key, value in record.items()}


def to_canonical(record: Any, fmt: str = "auto", system_prompt: str | None = None, system_mode: str = "add") -> tuple[str, dict]:
    """(detected format, canonical row) for one row, text normalised and validated."""
    detected = detect_format(record)
    if fmt != "auto" and detected != fmt:
        raise RowError(f"row looks like {detected} but the source says format: {fmt}")
    builder = {"chat": _from_chat, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "completion": _from_completion,
               "text": _from_text, "preference": _from_preference}[detected]
    row = builder(record)
    if "messages" in row:
        row["messages"] = _with_system(row["messages"], system_prompt, system_mode)
        validate_messages(row["messages"])
    elif "prompt" in row:
        row["prompt"] = _with_system(row["prompt"], system_prompt, system_mode)
        validate_messages(row["prompt"] + row["chosen"])
        validate_messages(row["prompt"] + row["rejected"])
    return detected, row


def kind_of(row: dict) -> str:
    return "chat" if "messages" in row else "text" if "text" in row else "preference"


_NEEDS_WHITESPACE_WORK = re.compile(r"[\t\f\v\r\u00a0]|  | \n|\n\n\n")


def normalise_text(value: str) -> str:
    """NFC, one space for runs of spaces/tabs, no trailing spaces on lines, at most one blank line, trimmed."""
    if not unicodedata.is_normalized("NFC", value):
        value = unicodedata.normalize("NFC", value)
    if not _NEEDS_WHITESPACE_WORK.search(value):  # most text: nothing to collapse
        return value.strip()
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    value = _SPACES.sub(" ", value)
    value = _TRAILING.sub("\n", value)
    return _BLANK_LINES.sub("\n\n", value).strip()


# Characters no training text should hold: C0/C1 controls other than tab, newlines, vertical tab and form feed (which
# normalise to whitespace), DEL, lone surrogate halves (JSON's "\ud800" decodes to one; it is not a code point
# UTF-8 can write) and the noncharacters U+FFFE/U+FFFF.
_BAD_CHARACTER = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
# Anything that prints: not whitespace, and not a zero-width, joiner, direction or other invisible format character.
_VISIBLE = re.compile("[^\\s\u00ad\u034f\u115f\u1160\u180e\u200b-\u200f\u2028-\u202f\u205f-\u206f\u3164\ufeff\uffa0]")


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field} must be a string, got {type(value).__name__}")
    if bad := _BAD_CHARACTER.search(value):
        raise RowError(f"{field} holds {_character_kind(bad.group())} U+{ord(bad.group()):04X} at character {bad.start()}")
    return normalise_text(value)


def _character_kind(character: str) -> str:
    if "\ud800" <= character <= "\udfff":
        return "a lone surrogate half (not a valid code point)"
    if character in "\ufffe\uffff":
        return "the noncharacter"
    return "the control character"


def check_visible(text: str, field: str) -> None:
    """Text made only of whitespace and invisible characters (zero-width spaces, joiners, BOMs) teaches nothing."""
    if not text:
        raise RowError(f"{field} is empty")
    if not _VISIBLE.search(text):
        raise RowError(f"{field} has no visible characters (only whitespace or zero-width/format characters)")


def _message_list(messages: Any, field: str, role_key: str = "role", content_key: str = "content", roles: dict | None = None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError(f"{field} must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise RowError(f"{field}[{i}] must be an object with {role_key} and {content_key}")
        extra = set(message) - {role_key, content_key, "name", "weight", *REASONING_KEYS}
        if extra:
            raise RowError(f"{field}[{i}] has unsupported keys: {', '.join(sorted(map(str, extra)))}")
        role = message[role_key]
        if not isinstance(role, str):
            raise RowError(f"{field}[{i}].{role_key} must be a string, got {type(role).__name__}")
        if roles is not None:
            if role not in roles:
                raise RowError(f"{field}[{i}].{role_key} {role!r} is not one of {', '.join(roles)}")
            role = roles[role]
        out.append(_with_reasoning({"role": role, "content": _text(message[content_key], f"{field}[{i}].{content_key}")},
                                   message, f"{field}[{i}]"))
    return out


REASONING_KEYS = ("reasoning_content", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # as vLLM and OpenAI-compatible APIs return an answer's reasoning


def _with_reasoning(out: dict, message: dict, field: str) -> dict:
    """An assistant message's reasoning in `reasoning_content`, given as a field or as `<think>...</think>` in the content."""
    given = [k for k in REASONING_KEYS if message.get(k) is not None]
    if given and out["role"] != "assistant":
        raise RowError(f"{field}.{given[0]}: only assistant messages carry reasoning")
    if len(given) > 1:
        raise RowError(f"{field}: give the reasoning once, as reasoning_content or reasoning, not both")
    if given:
        out["reasoning_content"] = _text(message[given[0]], f"{field}.{given[0]}")
    return canonical_messages([out])[0] if out["role"] == "assistant" else out


def _from_chat(record: dict) -> dict:
    return {"messages": _message_list(record["messages"], "messages")}


def _from_sharegpt(record: dict) -> dict:
    return {"messages": _message_list(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)}


def _from_alpaca(record: dict) -> dict:
    instruction = _text(record["instruction"], "instruction")
    extra = record.get("input")
    prompt = instruction if extra in (None, "") else f"{instruction}\n\n{_text(extra, 'input')}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "output")}]}


def _from_completion(record: dict) -> dict:
    return {"messages": [{"role": "user", "content": _text(record["prompt"], "prompt")},
                         {"role": "assistant", "content": _text(record["completion"], "completion")}]}


def _from_text(record: dict) -> dict:
    text = _text(record["text"], "text")
    check_visible(text, "text")
    return {"text": text}


def _from_preference(record: dict) -> dict:
    if "prompt" not in record:
        raise RowError("preference row has chosen/rejected but no prompt")
    prompt = record["prompt"]
    prompt = [{"role": "user", "content": _text(prompt, "prompt")}] if isinstance(prompt, str) else _message_list(prompt, "prompt")
    chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    if chosen == rejected:
        raise RowError("chosen and rejected are the same answer: the row teaches no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _answer(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, field)}]
    messages = _message_list(value, field)
    if [m["role"] for m in messages] != ["assistant"]:
        raise RowError(f"{field} must be one assistant message")
    return messages


def _with_system(messages: list[dict], system_prompt: str | None, mode: str) -> list[dict]:
    if not system_prompt:
        return messages
    has_system = messages[0]["role"] == "system"
    if mode == "replace" and has_system:
        return [{"role": "system", "content": system_prompt}, *messages[1:]]
    if not has_system:
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def validate_messages(messages: list[dict[str, str]]) -> None:
    """Roles known, optional leading system, then user/assistant alternating, ending on assistant, no empty text."""
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise RowError(f"messages[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}")
        check_visible(message["content"], f"messages[{i}].content")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("no user/assistant turns")
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(f"messages[{i + offset}].role is {message['role']!r}, expected {expected!r} (turns must alternate user/assistant)")
    if turns[-1]["role"] != "assistant":
        raise RowError("the last message must be from the assistant")


def conversation_of(row: dict) -> list[dict]:
    """The conversation a chat or preference row describes (a preference row's prompt followed by the chosen answer):
    what evaluation and export generate from and compare against."""
    return row["messages"] if "messages" in row else row["prompt"] + row["chosen"]


def row_texts(row: dict) -> list[str]:
    """Every text field of a canonical row, in order."""
    if "text" in row:
        return [row["text"]]
    messages = row["messages"] if "messages" in row else row["prompt"] + row["chosen"] + row["rejected"]
    return [text for m in messages for text in (m.get("reasoning_content"), m["content"]) if text]


def map_texts(row: dict, fn) -> dict:
    """The same row with fn applied to every text field."""
    if "text" in row:
        return {"text": fn(row["text"])}
    def mapped(m: dict) -> dict:
        return {**m, "content": fn(m["content"]), **({"reasoning_content": fn(m["reasoning_content"])} if "reasoning_content" in m else {})}

    if "messages" in row:
        return {"messages": [mapped(m) for m in row["messages"]]}
    return {key: [mapped(m) for m in row[key]] for key in ("prompt", "chosen", "rejected")}


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text, as vLLM's reasoning parsers split it: what precedes `</think>`
    is reasoning. opened: the prompt already opened `<think>` (DeepSeek-R1), so an unclosed text is all reasoning."""
    if THINK_CLOSE in text:
        before, _, after = text.partition(THINK_CLOSE)
        return before.replace(THINK_OPEN, "", 1).strip("\n"), after.lstrip("\n")
    if text.lstrip().startswith(THINK_OPEN) or opened:
        return text.replace(THINK_OPEN, "", 1).strip("\n"), ""
    return "", text


def canonical_messages(messages: list[dict]) -> list[dict]:
    """Assistant reasoning in one place, `reasoning_content` (as vLLM and OpenAI-compatible APIs return it),
    whether it came that way or as `<think>...</think>` inside the content."""
    out = []
    for message in messages:
        if message.get("role") == "assistant" and not message.get("reasoning_content") and THINK_CLOSE in (message.get("content") or ""):
            reasoning, answer = split_reasoning(message["content"])
            message = {**message, "content": answer, "reasoning_content": reasoning}
        if "reasoning_content" in message and not message["reasoning_content"]:
            message = {k: v for k, v in message.items() if k != "reasoning_content"}
        out.append(message)
    return out
