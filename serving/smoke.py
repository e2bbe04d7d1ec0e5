"""Smoke test of a deployed model: the eval prompts sent to any OpenAI-compatible server (vLLM, `transformers
serve`, a hosted endpoint), which applies the chat template itself, exactly as production traffic arrives.

It answers the two questions a platform team has after a deploy: does the served model still give the answers
the evaluated model gave (exact match), and how long does a request take (latency percentiles)? Answers cut by
the token limit are counted: a model that never stops is the classic template/eos mistake.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.formats import conversation_of
from evaluation.metrics import exact_match, normalised_exact_match

log = logging.getLogger(__name__)


@dataclass
class SmokeReport:
    base_url: str
    model: str
    requests: int
    failed: int
    exact_match: float
    normalized_exact_match: float
    cut_by_token_limit: int  # finish_reason "length": the answer did not stop by itself
    latency_s: dict[str, float]
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        latency = self.latency_s
        return [
            f"smoke test of {self.model} at {self.base_url}: {self.requests} requests, {self.failed} failed",
            f"exact match {self.exact_match:.4f}, normalized exact match {self.normalized_exact_match:.4f}, "
            f"answers cut by the token limit: {self.cut_by_token_limit}",
            f"latency p50 {latency['p50']:.3f} s, p95 {latency['p95']:.3f} s, max {latency['max']:.3f} s, mean {latency['mean']:.3f} s",
        ]


def suite_conversations(path: str | Path, limit: int | None) -> list[list[dict]]:
    """The suite file's rows (any data-source format), validated like an evaluation suite: a bad row names its file and row."""
    from evaluation.evaluate import suite_rows
    from recipes.schema import DataSource, EvalSuite

    suite = EvalSuite(name="smoke", sources=[DataSource(path=str(Path(path).resolve()))])
    return [conversation_of(row) for row in suite_rows(suite, None, limit)]


def smoke(base_url: str, model: str, conversations: list[list[dict]], max_tokens: int = 64, timeout_s: float = 60.0,
          api_key: str | None = None) -> SmokeReport:
    """Send each conversation's prompt (all turns but the last answer) greedily, one request at a time, and compare the
    answers with the references."""
    import httpx

    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    examples, latencies = [], []
    with httpx.Client(timeout=timeout_s, headers=headers) as client:
        for conversation in conversations:
            body = {"model": model, "messages": conversation[:-1], "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            try:
                response = client.post(url, json=body)
                response.raise_for_status()
                choice = response.json()["choices"][0]
                answer, finish, error = choice["message"]["content"] or "", choice.get("finish_reason"), None
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                answer, finish, error = "", None, _describe(exc)
                log.warning("request failed: %s", error)
            latencies.append(time.perf_counter() - started)
            examples.append({"prompt": conversation[-2]["content"], "reference": conversation[-1]["content"], "answer": answer,
                             "finish_reason": finish, "latency_s": round(latencies[-1], 4), "error": error})
    return _report(base_url, model, examples, latencies)


def _describe(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"


def _report(base_url: str, model: str, examples: list[dict], latencies: list[float]) -> SmokeReport:
    answered = [e for e in examples if e["error"] is None]
    n = max(len(examples), 1)
    ordered = sorted(latencies) or [0.0]
    return SmokeReport(
        base_url=base_url, model=model, requests=len(examples), failed=len(examples) - len(answered),
        exact_match=sum(exact_match(e["answer"], e["reference"], None) for e in answered) / n,
        normalized_exact_match=sum(normalised_exact_match(e["answer"], e["reference"], None) for e in answered) / n,
        cut_by_token_limit=sum(e["finish_reason"] == "length" for e in answered),
        latency_s={"p50": _percentile(ordered, 0.5), "p95": _percentile(ordered, 0.95), "max": ordered[-1],
                   "mean": statistics.fmean(ordered)},
        examples=examples,
    )


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]
