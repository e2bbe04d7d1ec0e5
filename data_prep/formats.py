"""Normalise chat, alpaca and prompt/completion rows into one canonical chat row, and validate it.

The canonical row is `{"messages": [{"role": ..., "content": ...}, ...]}`: an optional system message,
then user/assistant turns alternating, ending with the assistant (what SFT learns from).
"""
from __future__ import annotations

import unicodedata
from typing import Any

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


def detect_format(record: Any) -> str:
    """chat | alpaca | completion, from the keys the row has."""
    if not isinstance(record, dict):
        raise RowError(f"row is a {type(record).__name__}, expected an object")
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    raise RowError(
        f"unrecognised row format (keys: {', '.join(sorted(map(str, record))) or 'none'}); "
        "expected messages, instruction/output or prompt/completion"
    )


def to_messages(record: Any, fmt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Convert one row of the given format (or auto) into validated canonical messages."""
    detected = detect_format(record)
    if fmt != "auto" and detected != fmt:
        raise RowError(f"row looks like {detected} but the source says format: {fmt}")
    messages = {"chat": _from_chat, "alpaca": _from_alpaca, "completion": _from_completion}[detected](record)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    validate_messages(messages)
    return messages


def _from_chat(record: dict) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message or "content" not in message:
            raise RowError(f"messages[{i}] must be an object with exactly role and content")
        out.append({"role": message["role"], "content": _text(message["content"], f"messages[{i}].content")})
    return out


def _from_alpaca(record: dict) -> list[dict[str, str]]:
    instruction = _text(record["instruction"], "instruction")
    extra = record.get("input")
    prompt = instruction if extra in (None, "") else f"{instruction}\n\n{_text(extra, 'input')}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "output")}]


def _from_completion(record: dict) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": _text(record["prompt"], "prompt")},
        {"role": "assistant", "content": _text(record["completion"], "completion")},
    ]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field} must be a string, got {type(value).__name__}")
    return unicodedata.normalize("NFC", value)


def validate_messages(messages: list[dict[str, str]]) -> None:
    """Roles known, optional leading system, then user/assistant alternating, ending on assistant, no empty text."""
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise RowError(f"messages[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}")
        if not message["content"].strip():
            raise RowError(f"messages[{i}].content is empty")
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
