"""The evaluation stage: every suite on the base model and on the candidate (base + adapter), same rows.

The candidate is evaluated with the adapter on the base in 16/32-bit, which is exactly what export
merges and ships (for QLoRA too: the 4-bit base is a training device, not the deliverable).
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.files import atomic_write_json, sha256_file
from data_prep.formats import RowError, conversation_of, rename_columns, to_canonical
from data_prep.prepare import PreparedData, read_jsonl
from data_prep.readers import DataError, parse_jsonl_line
from evaluation.confidence import RowStatistic, interval
from evaluation.endpoints import EndpointClient
from evaluation.generate import answer_all, eval_losses, load_model, preference_margins
from evaluation.judge import Judge, Judged
from evaluation.judge import summary as judge_summary
from evaluation.metrics import CORPUS, GENERATION, MetricOptions, score_outputs
from evaluation.safety import safety_statistic
from recipes.schema import (JUDGE_METRICS, METRIC_DIRECTIONS, PREFERENCE_METRICS, SAFETY_SUITE, EndpointSection, EvalSuite, EvaluationSection,
                            ModelSection)
from training.train import TrainResult

log = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 512  # room for a judge's reasoning before its verdict (judge.endpoint.max_tokens overrides)


@dataclass
class Champion:
    """The model in production (from the registry): its artifact folder, whose model/ holds the merged weights and
    the tokenizer it serves with."""

    model: str
    version: str
    path: str

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "path": self.path}


@dataclass
class EvalResult:
    report_path: str
    examples: dict[str, int]  # rows evaluated per suite
    base: dict[str, float]  # metric key (metric, or suite/metric) -> value
    candidate: dict[str, float]
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # suite -> wins/losses/ties of the candidate vs base
    champion: dict[str, float] | None = None  # the production model's metrics, when the registry has one
    champion_info: dict | None = None  # which version, or why none was evaluated
    outcomes_vs_champion: dict[str, dict[str, int]] = field(default_factory=dict)
    scores: dict[str, "ModelScores"] = field(default_factory=dict, repr=False)  # every answer, for a later champion comparison
    generation: dict[str, dict] = field(default_factory=dict)  # model -> generated tokens, seconds, tokens/s, device
    quantized: dict[str, float] | None = None  # quantized.<metric> of the quantized export (export.quantize)
    quantization: dict | None = None  # how it was made and scored, its size and its delta against the 16-bit candidate
    contenders: dict[str, dict[str, float]] = field(default_factory=dict)  # endpoint name -> its metrics (evaluation.contenders)
    contender_info: dict[str, dict] = field(default_factory=dict)  # endpoint name -> url, model, token usage, prices
    pairwise: dict[str, dict[str, dict]] = field(default_factory=dict)  # other model -> suite -> the judge's wins/ties/losses
    judged: dict[str, dict[str, "Judged"]] = field(default_factory=dict, repr=False)  # the judge's raw verdicts, same keys
    intervals: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)  # level -> vs model -> metric -> interval
    confidence: float = 0.95
    bootstrap: dict = field(default_factory=lambda: {"samples": 1000, "seed": 0})
    statistics: dict[str, dict[str, RowStatistic]] = field(default_factory=dict, repr=False)  # model -> metric -> per-row data
    served: dict | None = None  # evaluation.serve: the served model's metrics and its parity with the candidate

    @property
    def delta(self) -> dict[str, float]:
        return {k: self.candidate[k] - self.base[k] for k in self.candidate}

    @property
    def delta_vs_champion(self) -> dict[str, float] | None:
        return {k: self.candidate[k] - self.champion[k] for k in self.candidate} if self.champion is not None else None

    def interval(self, versus: str | None, metric: str, confidence: float | None = None) -> dict | None:
        """The bootstrap interval of the candidate's metric (versus None) or of its delta against base, champion or a
        contender, at `confidence` (default: the evaluation's level)."""
        level, who = _level(confidence or self.confidence), versus or "candidate"
        if level in self.intervals:
            return self.intervals[level].get(who, {}).get(metric)
        mine, theirs = self.statistics.get("candidate", {}).get(metric), self.statistics.get(who, {}).get(metric)
        if mine is None or (versus is not None and theirs is None):
            return None
        return interval(mine, theirs if versus else None, confidence, self.bootstrap["samples"], self.bootstrap["seed"])

    def to_dict(self) -> dict:
        return {"report_path": self.report_path, "examples": self.examples, "base": self.base, "candidate": self.candidate,
                "delta": self.delta, "outcomes": self.outcomes, "champion": self.champion, "champion_info": self.champion_info,
                "delta_vs_champion": self.delta_vs_champion, "outcomes_vs_champion": self.outcomes_vs_champion,
                "generation": self.generation, "quantized": self.quantized, "quantization": self.quantization,
                "contenders": self.contenders, "contender_info": self.contender_info, "pairwise": self.pairwise,
                "confidence": self.confidence, "intervals": self.intervals, "served": self.served}

    def gated(self) -> dict[str, float]:
        """What gates read of the candidate: its metrics, those of its quantized export and of the served model."""
        return self.candidate | (self.quantized or {}) | (self.served or {}).get("metrics", {})


def _level(confidence: float) -> str:
    return f"{confidence:g}"


@dataclass
class SuiteScores:
    """One model on one suite: its answers, per-example scores, and the suite's metrics."""

    outputs: list[str]  # answers, reasoning stripped (as vLLM's reasoning parser returns `content`)
    per_example: list[dict[str, float]]
    metrics: dict[str, float]
    margins: list[float]
    reasoning_tokens: list[int] = field(default_factory=list)  # per answer, tokens of the reasoning before it
    losses: list[tuple[float, int]] = field(default_factory=list)  # per row: summed NLL of its answer tokens, token count
    references: list[str] = field(default_factory=list)
    judge_records: list[dict] = field(default_factory=list)  # the rubric judge's prompt and reply per answer

    def reasoning_summary(self) -> dict | None:
        if not any(self.reasoning_tokens):
            return None
        counts = self.reasoning_tokens
        return {"answers_with_reasoning": sum(1 for n in counts if n), "mean_tokens": round(sum(counts) / len(counts), 1),
                "max_tokens": max(counts)}

    def statistic(self, metric: str) -> RowStatistic | None:
        """How this suite's metric is recomputed on resampled rows (None when it was not measured)."""
        if metric not in self.metrics:
            return None
        if metric in CORPUS:
            return RowStatistic("corpus", metric=metric, outputs=self.outputs, references=self.references)
        if metric in ("eval_loss", "perplexity"):
            return RowStatistic("ratio", [t for t, _ in self.losses], [float(n) for _, n in self.losses],
                                "exp" if metric == "perplexity" else None)
        if metric == "preference_accuracy":
            return RowStatistic("mean", [float(m > 0) for m in self.margins])
        if metric == "preference_margin":
            return RowStatistic("mean", list(self.margins))
        return RowStatistic("mean", [e.get(metric, math.nan) for e in self.per_example])


@dataclass
class ModelScores:
    """One model on every suite and on the safety probes."""

    suites: list[SuiteScores]
    safety: dict[str, float]
    probes: list[dict]
    generation: dict = field(default_factory=dict)  # tokens and seconds of the suites' generation

    def metrics(self, suites: list[tuple[EvalSuite, list[dict]]]) -> dict[str, float]:
        out = {suite.metric_key(k): v for (suite, _), scores in zip(suites, self.suites, strict=True) for k, v in scores.metrics.items()}
        return out | {f"{SAFETY_SUITE}.{k}": v for k, v in self.safety.items()}

    def statistics(self, suites: list[tuple[EvalSuite, list[dict]]]) -> dict[str, RowStatistic]:
        """Every metric's per-row data, keyed as gates name them, for bootstrap intervals."""
        out = {suite.metric_key(m): stat for (suite, _), scores in zip(suites, self.suites, strict=True)
               for m in scores.metrics if (stat := scores.statistic(m)) is not None}
        return out | {f"{SAFETY_SUITE}.{m}": stat for m in self.safety if (stat := safety_statistic(self.probes, m)) is not None}


def evaluate(section: EvaluationSection, model_section: ModelSection, trained: TrainResult, data: PreparedData, out_dir: str | Path,
             champion: Champion | None = None) -> EvalResult:
    """Score base, candidate, the contenders and (when given) the champion on every suite; write report.json with every
    example's outputs and scores."""
    result = score_base_and_candidate(section, model_section, trained, data, out_dir)
    return compare_with_champion(result, section, data, champion, out_dir, trained.adapter_path)


def score_base_and_candidate(section: EvaluationSection, model_section: ModelSection, trained: TrainResult, data: PreparedData,
                             out_dir: str | Path) -> EvalResult:
    """The base model, the candidate and the contenders on the same rows; kept apart from the champion, which changes
    when another version is promoted while these scores stay valid."""
    from peft import PeftModel

    from training.models import load_saved_tokenizer

    suites = _suites(section, data)
    tokenizer = load_saved_tokenizer(trained.adapter_path)  # the tokenizer training used, template and render settings included
    with judging(section) as judge:
        model = load_model(trained.base.path, trained.base.revision, trust_remote_code=model_section.trust_remote_code, tokenizer=tokenizer)
        scores = {"base": score_model(model, tokenizer, section, suites, judge)}
        model = PeftModel.from_pretrained(model, trained.adapter_path).eval()
        scores["candidate"] = score_model(model, tokenizer, section, suites, judge)
        del model
        contenders = {}
        for endpoint in section.contenders:
            with EndpointClient(endpoint, section.generation.max_new_tokens) as client:
                scores[endpoint.name] = score_model(client, None, section, suites, judge)
                contenders[endpoint.name] = endpoint_info(endpoint, client)
        judged = judge_pairs(judge, section, suites, scores, [o for o in section.judge.pairwise if o != "champion"])
    return _write_report(section, suites, scores, None, Path(out_dir) / "report.json", contenders, judged)


def compare_with_champion(result: EvalResult, section: EvaluationSection, data: PreparedData, champion: Champion | None,
                          out_dir: str | Path, adapter_path: str | None = None) -> EvalResult:
    """Add the production model's scores on the same rows, with deltas and wins/losses/ties; rewrite report.json.
    A production version exported from this very adapter (a re-run of an unchanged recipe) is not another model:
    nothing is compared, so the re-run reproduces the same artifact instead of registering a copy."""
    if champion is None:
        return result
    if adapter_path and _exported_from(champion, Path(adapter_path)):
        log.info("production version %s was exported from this adapter: no other model to compare with", champion.version)
        return result
    suites = _suites(section, data)
    with judging(section) as judge:
        champion_info, champion_scores = _score_champion(champion, section, suites, judge)
        scores = {who: model for who, model in result.scores.items() if who != "champion"}
        judged = {who: verdicts for who, verdicts in result.judged.items() if who != "champion"}
        if champion_scores is not None:
            scores["champion"] = champion_scores
            if "champion" in section.judge.pairwise:
                judged |= judge_pairs(judge, section, suites, scores, ["champion"])
    return _write_report(section, suites, scores, champion_info, Path(out_dir) / "report.json", result.contender_info, judged)


@contextmanager
def judging(section: EvaluationSection):
    """The LLM judge for this evaluation (None when the recipe configures none), its connection closed afterwards."""
    if section.judge.endpoint is None:
        yield None
        return
    with EndpointClient(section.judge.endpoint, JUDGE_MAX_TOKENS) as client:
        yield Judge(section.judge, client)


def endpoint_info(endpoint: EndpointSection, client: EndpointClient) -> dict:
    """What the report says about a contender: where it was asked, its prices and the usage it reported."""
    return {"base_url": endpoint.base_url, "model": endpoint.model, "usage": client.usage.to_dict(),
            "usd_per_million_input_tokens": endpoint.usd_per_million_input_tokens,
            "usd_per_million_output_tokens": endpoint.usd_per_million_output_tokens}


def judge_pairs(judge: "Judge | None", section: EvaluationSection, suites, scores: dict[str, ModelScores],
                others: list[str]) -> dict[str, dict[str, "Judged"]]:
    """The candidate's answers judged against each other model's on the judge's suites (both orders)."""
    if judge is None:
        return {}
    judged: dict[str, dict] = {}
    for other in others:
        for i, (suite, rows) in enumerate(suites):
            if suite.name not in section.judge.suites or not scores["candidate"].suites[i].outputs:
                continue
            conversations = [conversation_of(row) for row in rows]
            judged.setdefault(other, {})[suite.name] = judge.pairwise(
                [c[-2]["content"] for c in conversations], [c[-1]["content"] for c in conversations],
                scores["candidate"].suites[i].outputs, scores[other].suites[i].outputs)
    return judged


def _exported_from(champion: Champion, adapter_dir: Path) -> bool:
    manifest = Path(champion.path) / "manifest.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not (manifest.is_file() and weights.is_file()):
        return False
    shipped = json.loads(manifest.read_text()).get("files", {}).get("adapter/adapter_model.safetensors")
    return shipped == sha256_file(weights)


def _suites(section: EvaluationSection, data: PreparedData) -> list[tuple[EvalSuite, list[dict]]]:
    return [(suite, suite_rows(suite, data, section.max_samples)) for suite in section.suites]


def score_model(model, tokenizer, section: EvaluationSection, suites: list[tuple[EvalSuite, list[dict]]], judge=None) -> ModelScores:
    """One model on every suite and probe: a model in this process, or an endpoint (tokenizer None)."""
    safety, probes = _safety(model, tokenizer, section, suites)
    throughput: dict = {}
    scored = [score_suite(model, tokenizer, suite, rows, section, throughput, judge) for suite, rows in suites]
    if throughput.get("seconds"):
        device = str(model.device) if tokenizer is not None else f"endpoint {model.section.base_url}"
        throughput |= {"tokens_per_s": round(throughput["tokens"] / throughput["seconds"], 1), "device": device,
                       "batch_size": section.generation.batch_size if tokenizer is not None else model.section.concurrency}
    return ModelScores(scored, safety, probes, throughput)


def _score_champion(champion: Champion, section: EvaluationSection, suites, judge=None) -> tuple[dict, ModelScores | None]:
    """The production artifact's merged model with its own tokenizer and chat template, on the same rows."""
    from training.models import load_saved_tokenizer

    model_dir = Path(champion.path) / "model"
    if not (model_dir / "config.json").is_file():
        reason = f"production version {champion.version} has no merged model ({model_dir}); not compared"
        log.warning(reason)
        return {**champion.to_dict(), "evaluated": False, "reason": reason}, None
    tokenizer = load_saved_tokenizer(model_dir)
    scores = score_model(load_model(str(model_dir)), tokenizer, section, suites, judge)
    return {**champion.to_dict(), "evaluated": True}, scores


def _write_report(section: EvaluationSection, suites, scores: dict[str, ModelScores], champion_info: dict | None, path: Path,
                  contender_info: dict[str, dict] | None = None, judged: dict[str, dict[str, "Judged"]] | None = None) -> EvalResult:
    base, candidate, champion = scores["base"], scores["candidate"], scores.get("champion")
    contender_info, judged = contender_info or {}, judged or {}
    result = EvalResult(report_path=str(path), examples={suite.name: len(rows) for suite, rows in suites},
                        base=base.metrics(suites), candidate=candidate.metrics(suites),
                        champion=champion.metrics(suites) if champion else None, champion_info=champion_info, scores=scores,
                        generation={name: model.generation for name, model in scores.items()},
                        contenders={name: scores[name].metrics(suites) for name in contender_info}, contender_info=contender_info,
                        judged=judged, confidence=section.confidence,
                        bootstrap={"samples": section.bootstrap_samples, "seed": section.bootstrap_seed},
                        statistics={who: model.statistics(suites) for who, model in scores.items()})
    result.intervals = intervals(section, result.statistics)
    report_suites = {}
    for i, (suite, rows) in enumerate(suites):
        examples = compare_examples(suite, rows, {who: model.suites[i] for who, model in scores.items()})
        result.outcomes[suite.name] = _tally(examples, "outcome")
        report_suites[suite.name] = {"examples": len(rows), **{who: model.suites[i].metrics for who, model in scores.items()},
                                     "outcomes": result.outcomes[suite.name], "per_example": examples,
                                     "reasoning": {who: scores.suites[i].reasoning_summary() for who, scores in scores.items()}}
        for who in scores:
            if who not in ("base", "candidate"):
                report_suites[suite.name][f"outcomes_vs_{who}"] = _tally(examples, f"outcome_vs_{who}")
        if champion:
            result.outcomes_vs_champion[suite.name] = report_suites[suite.name]["outcomes_vs_champion"]
        if rubric := {who: model.suites[i].judge_records for who, model in scores.items() if model.suites[i].judge_records}:
            report_suites[suite.name]["judge_rubric"] = rubric
    result.pairwise = pairwise_summaries(section, judged)
    safety = {}
    if section.safety.enabled:
        safety = {who: model.safety for who, model in scores.items()} | {"per_probe": [
            {"kind": b["kind"], "prompt": b["prompt"], "variants": b.get("variants")}
            | {f"{who}_{key}": model.probes[j][field] for who, model in scores.items() for key, field in (("answer", "answer"), ("safe", "safe"))}
            for j, b in enumerate(base.probes)]}
    judge = section.judge
    atomic_write_json(path, {**result.to_dict(), "metrics_higher_is_better": METRIC_DIRECTIONS, "suites": report_suites, SAFETY_SUITE: safety,
                             "judge": None if judge.endpoint is None else {
                                 "endpoint": {"base_url": judge.endpoint.base_url, "model": judge.endpoint.model},
                                 "pairwise_prompt": judge.pairwise_prompt, "rubric_prompt": judge.rubric_prompt, "rubric": judge.rubric,
                                 "scale": judge.scale, "pairwise": {other: {suite: verdicts.records for suite, verdicts in by_suite.items()}
                                                                    for other, by_suite in judged.items()}}})
    log.info("evaluation: base %s, candidate %s, champion %s, contenders %s", result.base, result.candidate, result.champion,
             result.contenders)
    return result


def intervals(section: EvaluationSection, statistics: dict[str, dict[str, RowStatistic]]) -> dict[str, dict[str, dict[str, dict]]]:
    """Paired bootstrap intervals of the candidate's metrics and of its delta against every other model, at the
    evaluation's level and at each recipe gate's (a policy's gate at another level is computed when it is applied)."""
    levels = sorted({section.confidence, *(gate.confidence for gate in section.gates if gate.confidence is not None)})
    candidate = statistics["candidate"]
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for level in levels:
        by_model = out.setdefault(_level(level), {})
        for who, theirs in statistics.items():
            versus = None if who == "candidate" else theirs
            for metric, mine in candidate.items():
                if versus is not None and metric not in versus:
                    continue
                found = interval(mine, versus.get(metric) if versus is not None else None, level, section.bootstrap_samples,
                                 section.bootstrap_seed)
                if found is not None:
                    by_model.setdefault(who, {})[metric] = found
    return out


def pairwise_summaries(section: EvaluationSection, judged: dict[str, dict[str, "Judged"]]) -> dict[str, dict[str, dict]]:
    """Per other model and suite: the judge's wins, ties, losses, unparseable verdicts and the win rate with its interval."""
    out: dict[str, dict[str, dict]] = {}
    for other, by_suite in judged.items():
        for suite, verdicts in by_suite.items():
            found = interval(RowStatistic("mean", verdicts.scores), None, section.confidence, section.bootstrap_samples,
                             section.bootstrap_seed)
            out.setdefault(other, {})[suite] = judge_summary(verdicts) | {"interval": found}
    return out


def _tally(examples: list[dict], key: str) -> dict[str, int]:
    return {o: sum(e[key] == o for e in examples) for o in ("win", "loss", "tie")}


def _safety(model, tokenizer, section: EvaluationSection, suites: list[tuple[EvalSuite, list[dict]]]) -> tuple[dict, list[dict]]:
    """Red-team and bias probes, asked under the task's system prompt (that of the held-out rows, when they share one)."""
    if not section.safety.enabled:
        return {}, []
    from evaluation.safety import run_safety

    rows = next((rows for suite, rows in suites if not suite.sources), suites[0][1])
    conversations = [conversation_of(row) for row in rows]
    systems = {c[0]["content"] for c in conversations if c[0]["role"] == "system"}
    system = systems.pop() if len(systems) == 1 and all(c[0]["role"] == "system" for c in conversations) else None
    return run_safety(model, tokenizer, section.safety, [c[-2]["content"] for c in conversations], section.generation.batch_size, system)


def suite_rows(suite: EvalSuite, data: PreparedData, default_max: int | None) -> list[dict]:
    """The suite's canonical rows: the held-out split, or its own files read and validated like data sources
    (a bad row is an error naming the file and row: evaluation data is never dropped silently)."""
    limit = suite.max_samples or default_max
    if not suite.sources:
        rows = read_jsonl(data.eval_path)[:limit]
    else:
        from data_prep.sources import iter_source

        rows = []
        for source in suite.sources:
            for raw in iter_source(source):
                if raw.line is not None:  # JSONL lines arrive unparsed
                    raw = parse_jsonl_line(raw.source, raw.row, raw.line)
                try:
                    if raw.error:
                        raise RowError(raw.error)
                    rows.append(to_canonical(rename_columns(raw.record, source.columns), source.format)[1])
                except RowError as exc:
                    raise DataError(f"evaluation suite {suite.name!r}: {raw.source} row {raw.row}: {exc}") from None
        rows = rows[:limit]
    if not rows:
        raise DataError(f"evaluation suite {suite.name!r} has no rows")
    wanted = [m for m in suite.metrics if m in PREFERENCE_METRICS]
    if wanted and not all("chosen" in row for row in rows):
        raise DataError(f"evaluation suite {suite.name!r}: {', '.join(wanted)} need preference rows ({{prompt, chosen, rejected}})")
    if any("text" in row for row in rows):
        raise DataError(f"evaluation suite {suite.name!r} holds text rows; suites evaluate conversations (chat or preference rows)")
    return rows


def score_suite(model, tokenizer, suite: EvalSuite, rows: list[dict], section: EvaluationSection,
                throughput: dict | None = None, judge: "Judge | None" = None) -> SuiteScores:
    """The suite's metrics for one model: generation metrics on its greedy answers (judge_score: the judge's rubric
    grade of each), the others on the references. Through an endpoint (tokenizer None) only what its answers show
    is measured: log-probability metrics are left out."""
    batch_size = section.generation.batch_size
    conversations = [conversation_of(row) for row in rows]
    references = [c[-1]["content"] for c in conversations]
    outputs: list[str] = []
    reasoning_tokens: list[int] = []
    if any(m in GENERATION or m in JUDGE_METRICS for m in suite.metrics):
        generation = section.generation
        outputs = answer_all(model, tokenizer, conversations, generation.max_new_tokens, batch_size, generation.sampling(), generation.seed,
                             throughput, reasoning_tokens)
    options = MetricOptions(json_schema=suite.check_json_schema() if suite.json_schema is not None else None, regex=suite.regex)
    metrics, per_example = score_outputs(suite.metrics, outputs, references, options) if outputs else ({}, [{} for _ in rows])
    judge_records: list[dict] = []
    if "judge_score" in suite.metrics and judge is not None:
        graded = judge.rubric([c[-2]["content"] for c in conversations], references, outputs)
        for example, score in zip(per_example, graded.scores, strict=True):
            example["judge_score"] = score
        metrics["judge_score"] = RowStatistic("mean", graded.scores).value()
        judge_records = [record | {"index": i} for i, record in enumerate(graded.records)]
    losses: list[tuple[float, int]] = []
    if {"eval_loss", "perplexity"} & set(suite.metrics) and tokenizer is not None:
        losses = eval_losses(model, tokenizer, conversations, batch_size)
        loss = RowStatistic("ratio", [t for t, _ in losses], [float(n) for _, n in losses]).value()
        metrics.update({k: v for k, v in (("eval_loss", loss), ("perplexity", math.exp(loss))) if k in suite.metrics})
    margins: list[float] = []
    if set(PREFERENCE_METRICS) & set(suite.metrics) and tokenizer is not None:
        margins = preference_margins(model, tokenizer, rows, batch_size)
        metrics.update({k: v for k, v in (("preference_accuracy", sum(m > 0 for m in margins) / len(margins)),
                                          ("preference_margin", sum(margins) / len(margins))) if k in suite.metrics})
    return SuiteScores(outputs, per_example, {m: metrics[m] for m in suite.metrics if m in metrics}, margins, reasoning_tokens,
                       losses, references, judge_records)


def compare_examples(suite: EvalSuite, rows: list[dict], models: dict[str, SuiteScores]) -> list[dict]:
    """Every example with each model's outputs and scores, and whether the candidate won, lost or tied against the
    base (outcome) and every other model (outcome_vs_<model>) on the suite's first metric that scores each example
    (a generation metric, or the preference margin)."""
    base, candidate = models["base"], models["candidate"]
    primary = next((m for m in suite.metrics if m in (base.per_example[0] if base.per_example else {})
                    or (m in PREFERENCE_METRICS and base.margins)), None)  # the first metric scored per example
    examples = []
    for i, row in enumerate(rows):
        conversation = conversation_of(row)
        example = {"index": i, "prompt": conversation[-2]["content"], "reference": conversation[-1]["content"]}
        for who, scores in models.items():
            if scores.outputs:
                example.update({f"{who}_output": scores.outputs[i], f"{who}_scores": scores.per_example[i]})
                if scores.reasoning_tokens and scores.reasoning_tokens[i]:
                    example[f"{who}_reasoning_tokens"] = scores.reasoning_tokens[i]
            if scores.margins:
                example[f"{who}_preference_margin"] = round(scores.margins[i], 4)
        if base.margins:
            example["rejected"] = row["rejected"][-1]["content"]
        example["outcome"] = _outcome(primary, i, base, candidate)
        for who, scores in models.items():
            if who not in ("base", "candidate"):
                example[f"outcome_vs_{who}"] = _outcome(primary, i, scores, candidate)
        examples.append(example)
    return examples


def _outcome(primary: str | None, i: int, reference: SuiteScores, candidate: SuiteScores) -> str:
    if primary in PREFERENCE_METRICS:
        if not reference.margins:
            return "not measured"
        before, after = reference.margins[i], candidate.margins[i]
    elif primary:
        before, after = reference.per_example[i].get(primary, math.nan), candidate.per_example[i][primary]
    else:
        before = after = 0.0
    if math.isnan(before) or math.isnan(after):
        return "not measured"
    return "win" if after > before else "loss" if after < before else "tie"
