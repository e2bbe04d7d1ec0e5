"""A client for OpenAI-compatible chat endpoints: the hosted API a candidate would replace, the LLM judge, and the
merged artifact behind a local server (evaluation.serve). One client, so all three are asked the same way.

Requests run `concurrency` at a time and keep the rows' order. A timeout, a refused connection, HTTP 408/409/429 or
a 5xx is retried with exponential backoff (Retry-After honoured); any other HTTP error is the recipe's fault (wrong
key, model or URL) and stops at once. A row is never dropped: when retries run out the evaluation fails, naming the
endpoint, the row and the last error, because a contender scored on fewer rows would not be comparable.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

from data_prep.formats import split_reasoning
from recipes.schema import EndpointSection

log = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


class EndpointRefused(ValueError):
    """The endpoint refused the request for a reason retrying cannot fix (HTTP 4xx): the recipe's key, model or URL."""


class EndpointUnavailable(RuntimeError):
    """The endpoint did not answer after every retry (down, overloaded, too slow)."""


@dataclass
class Reply:
    content: str  # the answer, reasoning removed
    finish_reason: str | None
    prompt_tokens: int | None  # as the server reported them (None: it reported no usage)
    completion_tokens: int | None
    latency_s: float
    attempts: int


@dataclass
class Usage:
    """What one endpoint was asked in one evaluation: requests, tokens the server reported, time, retries."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unreported: int = 0  # replies without a usage block: their tokens are unknown, so they are not priced
    retries: int = 0
    cut_by_token_limit: int = 0
    latency_s: float = 0.0
    wall_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, reply: Reply) -> None:
        with self._lock:
            self.requests += 1
            self.retries += reply.attempts - 1
            self.latency_s += reply.latency_s
            self.cut_by_token_limit += reply.finish_reason == "length"
            if reply.prompt_tokens is None or reply.completion_tokens is None:
                self.unreported += 1
            else:
                self.prompt_tokens += reply.prompt_tokens
                self.completion_tokens += reply.completion_tokens

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")} | {
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 1) if self.wall_s else None}


def api_key(section: EndpointSection) -> str | None:
    """The key from the named environment variable or Prefect Secret block; an unset source is an error naming it."""
    if section.api_key_env:
        key = os.environ.get(section.api_key_env)
        if not key:
            raise EndpointRefused(f"endpoint {section.name!r}: api_key_env {section.api_key_env} is not set")
        return key
    if section.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(section.api_key_secret).get()
        except ValueError as exc:
            raise EndpointRefused(f"endpoint {section.name!r}: api_key_secret {section.api_key_secret!r}: {exc}") from None
    return None


class EndpointClient:
    """Chat completions from one endpoint; usage accumulates over every call until read."""

    def __init__(self, section: EndpointSection, default_max_tokens: int = 64):
        import httpx

        self.section = section
        self.max_tokens = section.max_tokens or default_max_tokens
        self.url = section.base_url.rstrip("/") + "/chat/completions"
        key = api_key(section)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=section.timeout_s, headers=headers,
                                  limits=httpx.Limits(max_connections=section.concurrency))
        self.usage = Usage()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def answers(self, conversations: list[list[dict]], max_tokens: int | None = None, sampling: dict | None = None,
                seed: int = 0) -> list[Reply]:
        """One reply per conversation's prompt (every turn but the last, which is the reference answer), in order."""
        return self.complete([conversation[:-1] for conversation in conversations], max_tokens, sampling, seed)

    def complete(self, prompts: list[list[dict]], max_tokens: int | None = None, sampling: dict | None = None,
                 seed: int = 0) -> list[Reply]:
        """One reply per message list, `concurrency` requests at a time; order kept."""
        started = time.perf_counter()
        bodies = [self._body(messages, max_tokens, sampling, seed) for messages in prompts]
        with ThreadPoolExecutor(self.section.concurrency) as pool:
            replies = list(pool.map(self._ask, range(len(bodies)), bodies))
        self.usage.wall_s += time.perf_counter() - started
        return replies

    def _body(self, messages: list[dict], max_tokens: int | None, sampling: dict | None, seed: int) -> dict:
        sampling = sampling or {"do_sample": False}
        body = {"model": self.section.model, "messages": messages, "max_tokens": max_tokens or self.max_tokens, **self.section.extra_body}
        if sampling.get("do_sample"):
            return body | {"temperature": sampling.get("temperature", 1.0), "top_p": sampling.get("top_p", 1.0), "seed": seed}
        return body | {"temperature": 0}

    def _ask(self, row: int, body: dict) -> Reply:
        import httpx

        last = ""
        for attempt in range(1, self.section.max_retries + 2):
            started = time.perf_counter()
            wait = None
            try:
                response = self._http.post(self.url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc or 'no response'}"
            else:
                if response.status_code == 200:
                    reply = self._reply(row, response, time.perf_counter() - started, attempt)
                    self.usage.add(reply)
                    return reply
                last = f"HTTP {response.status_code}: {response.text[:300].strip()}"
                if response.status_code not in RETRIED_STATUS:
                    raise EndpointRefused(f"endpoint {self.section.name!r} ({self.url}) refused row {row}: {last}")
                wait = _retry_after(response)
            if attempt <= self.section.max_retries:
                delay = wait if wait is not None else min(MAX_BACKOFF_S, self.section.backoff_s * 2 ** (attempt - 1))
                log.warning("endpoint %s row %d attempt %d: %s; retrying in %.1f s", self.section.name, row, attempt, last, delay)
                time.sleep(delay)
        raise EndpointUnavailable(f"endpoint {self.section.name!r} ({self.url}): row {row} failed after "
                                  f"{self.section.max_retries + 1} attempts; last: {last}")

    def _reply(self, row: int, response, latency: float, attempt: int) -> Reply:
        try:
            data = response.json()
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EndpointUnavailable(f"endpoint {self.section.name!r} ({self.url}): row {row}: the reply is not a chat "
                                      f"completion: {response.text[:300]}") from None
        _, answer = split_reasoning(content.strip(), False)  # a server without a reasoning parser leaves <think> in content
        usage = data.get("usage") or {}
        return Reply(answer.strip(), choice.get("finish_reason"), usage.get("prompt_tokens"), usage.get("completion_tokens"),
                     latency, attempt)


def _retry_after(response) -> float | None:
    """Seconds from a Retry-After header given in seconds (capped), else None."""
    value = response.headers.get("retry-after")
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None
