"""Production's outputs, scored after release with the scorers that gated it (the `monitor` flow's stage).

Two sources of outputs: the canary suite (held-out rows and red-team probes shipped in the artifact as canary.jsonl,
sent to the serving endpoint) and sampled traffic (request/response JSONL that a proxy or the serving layer wrote).
Each output is scored for refusals, PII the request did not hold, injection canaries, cut-off answers (stopped by
the token limit), failed requests, length, latency and, where a reference exists, the recipe's task metrics. Each
metric gets a bootstrap interval and is compared with the value recorded at evaluation (drift) and with the recipe's
monitoring thresholds; the result lists every breach in words.

Traffic record (one JSON object per line; the README documents it):
    {"time": "2026-12-03T10:00:00Z", "request": {"model": ..., "messages": [...]},
     "response": {"choices": [{"message": {"content": ...}, "finish_reason": "stop"}], "usage": {...}},
     "latency_ms": 412, "status": 200, "reference": "optional expected answer"}
A failed request has a non-2xx `status` or an `error` and no response. A line that is not such a record is listed
(file and line) as unreadable, never dropped silently.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from data_prep.formats import conversation_of
from data_prep.pii import Redactor
from evaluation.confidence import RowStatistic, interval
from evaluation.metrics import PER_EXAMPLE, MetricOptions
from evaluation.safety import REFUSE, is_refusal, load_red_team
from recipes.schema import (CANARY, HELD_OUT_SUITE, PII_TYPES, SAFETY_SUITE, TRAFFIC, MonitoringSection, Recipe,
                            monitoring_direction)

TASK = "task"
EXAMPLES_PER_FLAG = 5
FORMAT_METRICS = ("json_valid", "json_schema", "regex_match")  # scored on every output, reference or not
REASONS = {"refusal": "refused", "pii_leak": "PII the request did not hold", "injection_leak": "an injection canary",
           "cutoff": "cut off by the token limit", "error": "the request failed"}


class MonitoringError(ValueError):
    """Monitoring cannot run as configured (no traffic file matches, no endpoint, ...); names the field or file."""


@dataclass
class Output:
    """One answered (or failed) request, from traffic or the canary suite."""

    source: str  # traffic | canary
    where: str  # file and line, or canary row
    messages: list[dict]
    answer: str | None  # None: the request failed
    finish_reason: str | None = None
    latency_ms: float | None = None
    reference: str | None = None
    kind: str = TASK  # canary probes: harmful, jailbreak, prompt_injection, pii_extraction
    canary: str | None = None
    error: str | None = None


@dataclass
class Traffic:
    outputs: list[Output]
    unreadable: list[str]
    records: int  # readable records in the window, before sampling
    files: list[str]


# ---- the canary suite ------------------------------------------------------------------------------------------
def canary_suite(recipe: Recipe, eval_rows: list[dict], report: dict | None) -> list[dict]:
    """What the artifact ships as canary.jsonl: the first monitoring.canary_rows held-out rows (prompt, reference and
    the answer given at evaluation) and, with canary_probes, the red-team probes."""
    section = recipe.monitoring
    released = {}
    if report:
        released = {e["index"]: e.get("candidate_output") for e in report.get("suites", {}).get(HELD_OUT_SUITE, {}).get("per_example", [])}
    rows = []
    for index, row in enumerate(eval_rows[: section.canary_rows]):
        if "text" in row:  # plain text rows have no prompt to send
            continue
        conversation = conversation_of(row)
        rows.append({"kind": TASK, "messages": conversation[:-1], "reference": conversation[-1]["content"],
                     "released": released.get(index)})
    if section.canary_probes:
        system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
        rows += [{"kind": p.category, "messages": [*system, {"role": "user", "content": p.prompt}], "canary": p.canary}
                 for p in load_red_team(recipe.evaluation.safety)]
    return rows


def ask_canary(client, suite: list[dict]) -> list[Output]:
    """Send the canary suite to the endpoint; an endpoint that does not answer fails every row (an alert, not a crash)."""
    from evaluation.endpoints import EndpointRefused, EndpointUnavailable

    try:
        replies = client.complete([row["messages"] for row in suite])
    except (EndpointRefused, EndpointUnavailable) as exc:
        return [Output(CANARY, f"canary row {i + 1}", row["messages"], None, reference=row.get("reference"), kind=row["kind"],
                       canary=row.get("canary"), error=str(exc)) for i, row in enumerate(suite)]
    return [Output(CANARY, f"canary row {i + 1}", row["messages"], reply.content, reply.finish_reason, reply.latency_s * 1000,
                   row.get("reference"), row["kind"], row.get("canary")) for i, (row, reply) in enumerate(zip(suite, replies, strict=True))]


# ---- traffic -----------------------------------------------------------------------------------------------------
def read_traffic(location: str, section: MonitoringSection, now: datetime | None = None, seed: int = 0) -> Traffic:
    """Every readable record of the files `location` names (path, glob or fsspec URL), within the time window, then a
    seeded sample of at most traffic_sample."""
    import fsspec

    files = fsspec.open_files(location, mode="rt", encoding="utf-8")
    if not files:
        raise MonitoringError(f"monitoring.traffic: no file matches {location!r}")
    since = (now or datetime.now(timezone.utc)) - timedelta(hours=section.traffic_window_hours) if section.traffic_window_hours else None
    outputs, unreadable = [], []
    for opened in files:
        with opened as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{opened.path} line {number}"
                try:
                    record = _record(json.loads(line), where, since)
                except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                    unreadable.append(f"{where}: {exc}")
                    continue
                if record is not None:
                    outputs.append(record)
    records = len(outputs)
    if records > section.traffic_sample:
        outputs = sorted(random.Random(seed).sample(outputs, section.traffic_sample), key=lambda o: o.where)
    return Traffic(outputs, unreadable, records, [f.path for f in files])


def _record(data: dict, where: str, since: datetime | None) -> Output | None:
    """One traffic record (None: outside the window); ValueError naming the field that is missing or wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if since is not None:
        if "time" not in data:
            raise ValueError("no `time` (monitoring.traffic_window_hours needs one)")
        at = datetime.fromisoformat(str(data["time"]).replace("Z", "+00:00"))
        if (at if at.tzinfo else at.replace(tzinfo=timezone.utc)) < since:
            return None
    messages = data["request"]["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise ValueError("request.messages is not a list of messages")
    latency = data.get("latency_ms")
    if latency is not None and not isinstance(latency, int | float):
        raise ValueError("latency_ms is not a number")
    reference = data.get("reference")
    status = data.get("status", 200)
    if data.get("error") or not (200 <= int(status) < 300):
        return Output(TRAFFIC, where, messages, None, latency_ms=latency, reference=reference,
                      error=str(data.get("error") or f"HTTP {status}"))
    choice = data["response"]["choices"][0]
    content = choice["message"]["content"]
    if not isinstance(content, str):
        raise ValueError("response.choices[0].message.content is not text")
    return Output(TRAFFIC, where, messages, content, choice.get("finish_reason"), latency, reference)


# ---- scoring -------------------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """The release's scorers: its refusal markers, PII detectors, injection canaries and task metrics."""

    refusal_markers: list[str]
    canaries: list[str]
    task_metrics: list[str]
    options: MetricOptions
    redactor: Redactor = field(default_factory=lambda: Redactor(PII_TYPES))

    @classmethod
    def of(cls, recipe: Recipe) -> Scorer:
        suite = next((s for s in recipe.evaluation.suites if s.name == HELD_OUT_SUITE), recipe.evaluation.suites[0])
        options = MetricOptions(json_schema=suite.check_json_schema() if suite.json_schema is not None else None, regex=suite.regex)
        probe_canaries = [p.canary for p in load_red_team(recipe.evaluation.safety) if p.canary]
        return cls(recipe.evaluation.safety.refusal_markers, [*recipe.monitoring.injection_canaries, *probe_canaries],
                   [m for m in suite.metrics if m in PER_EXAMPLE], options)

    def flags(self, output: Output) -> dict[str, float]:
        """Per output: 1.0/0.0 for each flag, its length, latency, and task scores where a reference exists."""
        scores: dict[str, float] = {"error": float(output.answer is None)}
        if output.latency_ms is not None:
            scores["latency_ms"] = float(output.latency_ms)
        if output.answer is None:
            return scores
        answer = output.answer
        scores |= {"refusal": float(is_refusal(answer, self.refusal_markers)), "pii_leak": float(self.leaks(output)),
                   "injection_leak": float(any(c.lower() in answer.lower() for c in self.canaries)),
                   "cutoff": float(output.finish_reason == "length"), "answer_chars": float(len(answer))}
        for metric in self.task_metrics:
            if output.reference is not None or metric in FORMAT_METRICS:
                scores[metric] = PER_EXAMPLE[metric](answer, output.reference or "", self.options)
        return scores

    def leaks(self, output: Output) -> bool:
        """PII in the answer that the user's own messages did not hold (echoing a customer's own e-mail is not a leak;
        a phone number from the system prompt or the training data is)."""
        given = " ".join(m["content"] for m in output.messages if m.get("role") == "user" and isinstance(m.get("content"), str))
        return any(value not in given for _, value in self.redactor.findings(output.answer or ""))


# ---- the result --------------------------------------------------------------------------------------------------
RATE_FLAGS = {"refusal": "refusal_rate", "pii_leak": "pii_leak_rate", "injection_leak": "injection_leak_rate",
              "cutoff": "cutoff_rate", "error": "error_rate"}
PROBE_METRICS = {"refusal_rate": (REFUSE, "refusal", True), "injection_resistance": (("prompt_injection",), "injection_leak", False),
                 "pii_leak_rate": (("pii_extraction",), "pii_leak", True)}


def metric_values(source: str, outputs: list[Output], scored: list[dict]) -> dict[str, list[float]]:
    """Per-output values of each monitoring metric of one source (canary probes as canary.safety.<metric>)."""
    tasks = [(o, s) for o, s in zip(outputs, scored, strict=True) if o.kind == TASK]
    values: dict[str, list[float]] = {}
    for flag, metric in RATE_FLAGS.items():
        values[f"{source}.{metric}"] = [s[flag] for _, s in tasks if flag in s]
    for name in ("answer_chars", *PER_EXAMPLE):
        if found := [s[name] for _, s in tasks if name in s]:
            values[f"{source}.{name}"] = found
    if source == CANARY:
        probes = [(o, s) for o, s in zip(outputs, scored, strict=True) if o.kind != TASK]
        values[f"{CANARY}.error_rate"] = [s["error"] for _, s in tasks + probes]
        for metric, (kinds, flag, counts_flag) in PROBE_METRICS.items():
            chosen = [s[flag] if counts_flag else 1.0 - s[flag] for o, s in probes if o.kind in kinds and flag in s]
            if chosen:
                values[f"{CANARY}.{SAFETY_SUITE}.{metric}"] = chosen
    return {k: v for k, v in values.items() if v}


def latencies(source: str, scored: list[dict]) -> dict[str, float]:
    measured = sorted(s["latency_ms"] for s in scored if "latency_ms" in s)
    if not measured:
        return {}
    return {f"{source}.latency_p50_ms": _percentile(measured, 0.5), f"{source}.latency_p95_ms": _percentile(measured, 0.95)}


def _percentile(ordered: list[float], q: float) -> float:
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)


def recorded_values(manifest: dict, suite: list[dict], scorer: Scorer) -> dict[str, float]:
    """What evaluation recorded for each monitoring metric: the candidate's task and safety metrics from the manifest,
    and refusal, PII, injection and length from the answers the candidate gave to the canary rows at evaluation."""
    candidate = (manifest.get("evaluation") or {}).get("candidate") or {}
    recorded = {}
    for key, value in candidate.items():
        if key.startswith(f"{SAFETY_SUITE}."):
            recorded[f"{CANARY}.{key}"] = value
        elif key in PER_EXAMPLE:
            recorded[f"{CANARY}.{key}"] = recorded[f"{TRAFFIC}.{key}"] = value
    released = [Output(CANARY, "", row["messages"], row["released"], reference=row.get("reference"))
                for row in suite if row["kind"] == TASK and row.get("released") is not None]
    if released:
        scored = [scorer.flags(o) for o in released]
        for flag, metric in (*((f, m) for f, m in RATE_FLAGS.items() if f not in ("cutoff", "error")), ("answer_chars", "answer_chars")):
            value = sum(s[flag] for s in scored) / len(scored)
            recorded[f"{CANARY}.{metric}"] = recorded[f"{TRAFFIC}.{metric}"] = value
    return {k: v for k, v in recorded.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def monitor_outputs(section: MonitoringSection, scorer: Scorer, canary: list[Output], traffic: Traffic | None,
                    recorded: dict[str, float]) -> dict:
    """Every metric with its interval, its drift from the recorded value, the thresholds, and the breaches in words."""
    metrics, examples = {}, {}
    for source, outputs in ((CANARY, canary), (TRAFFIC, traffic.outputs if traffic else [])):
        scored = [scorer.flags(o) for o in outputs]
        for name, values in metric_values(source, outputs, scored).items():
            metrics[name] = interval(RowStatistic("mean", values), None, section.confidence, section.bootstrap_samples, seed=0)
        metrics |= {name: {"value": value, "rows": len(outputs)} for name, value in latencies(source, scored).items()}
        examples |= flagged_examples(source, outputs, scored)
    drift = {name: drift_of(name, metrics[name], recorded[name], section.drift_tolerance) for name in metrics if name in recorded}
    thresholds = [threshold_result(t, metrics.get(t.metric)) for t in section.thresholds]
    breaches = [f"{t['threshold']}: measured {t['value']:.4g}" for t in thresholds if t["breached"]]
    breaches += [f"{name} drifted from {d['recorded']:.4g} at evaluation to {d['value']:.4g} "
                 f"[{d['low']:.4g}, {d['high']:.4g}] (tolerance {section.drift_tolerance:g})" for name, d in drift.items() if d["drifted"]]
    if traffic and traffic.unreadable:
        breaches.append(f"{len(traffic.unreadable)} traffic line(s) unreadable, first: {traffic.unreadable[0]}")
    return {"metrics": metrics, "recorded": recorded, "drift": drift, "thresholds": thresholds, "breaches": breaches,
            "status": "breach" if breaches else "ok", "examples": examples,
            "counts": {"canary": len(canary), "traffic_scored": len(traffic.outputs) if traffic else 0,
                       "traffic_records": traffic.records if traffic else 0,
                       "traffic_unreadable": len(traffic.unreadable) if traffic else 0},
            "unreadable": traffic.unreadable[:50] if traffic else [], "traffic_files": traffic.files if traffic else []}


def drift_of(name: str, measured: dict, recorded: float, tolerance: float) -> dict:
    """The measured value's interval against the recorded one: drifted when it lies entirely on the worse side by more
    than the tolerance (a metric with no better direction is reported, never drifted)."""
    higher_is_better = monitoring_direction(name)
    low, high = measured.get("low", measured["value"]), measured.get("high", measured["value"])
    drifted = (high < recorded - tolerance) if higher_is_better else (low > recorded + tolerance) if higher_is_better is False else False
    return {"recorded": recorded, "value": measured["value"], "low": low, "high": high, "drifted": bool(drifted)}


def threshold_result(threshold, measured: dict | None) -> dict:
    """A threshold on the measured value; not measured (no such outputs this period) is not a breach, and says so."""
    if measured is None:
        return {"threshold": threshold.describe(), "value": None, "breached": False, "note": "not measured this run"}
    value = measured["value"]
    breached = value < threshold.min if threshold.min is not None else value > threshold.max
    return {"threshold": threshold.describe(), "value": value, "breached": bool(breached)}


def flagged_examples(source: str, outputs: list[Output], scored: list[dict]) -> dict[str, list[dict]]:
    """The first few outputs behind each flag (where they came from and the answer), so an alert can be checked."""
    found: dict[str, list[dict]] = {}
    for output, scores in zip(outputs, scored, strict=True):
        raised = [flag for flag in REASONS if scores.get(flag) == 1.0 and not (output.kind in REFUSE and flag == "refusal")]
        raised += [f"not_{metric}" for metric in FORMAT_METRICS if scores.get(metric) == 0.0]
        for flag in raised:
            if len(found.setdefault(f"{source}.{flag}", [])) < EXAMPLES_PER_FLAG:
                found[f"{source}.{flag}"].append({"where": output.where, "answer": (output.answer or output.error or "")[:300]})
    return {k: v for k, v in found.items() if v}
