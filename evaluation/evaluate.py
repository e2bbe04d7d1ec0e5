"""The evaluation stage: every suite on the base model and on the candidate (base + adapter), same rows.

The candidate is evaluated with the adapter on the base in 16/32-bit, which is exactly what export
merges and ships (for QLoRA too: the 4-bit base is a training device, not the deliverable).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.files import atomic_write_json, sha256_file
from data_prep.formats import RowError, conversation_of, rename_columns, to_canonical
from data_prep.prepare import PreparedData, read_jsonl
from data_prep.readers import DataError, parse_jsonl_line
from evaluation.generate import eval_loss, generate, load_model, preference_margins
from evaluation.metrics import GENERATION, MetricOptions, score_outputs
from recipes.schema import METRIC_DIRECTIONS, PREFERENCE_METRICS, SAFETY_SUITE, EvalSuite, EvaluationSection, ModelSection
from training.train import TrainResult

log = logging.getLogger(__name__)


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

    @property
    def delta(self) -> dict[str, float]:
        return {k: self.candidate[k] - self.base[k] for k in self.candidate}

    @property
    def delta_vs_champion(self) -> dict[str, float] | None:
        return {k: self.candidate[k] - self.champion[k] for k in self.candidate} if self.champion is not None else None

    def to_dict(self) -> dict:
        return {"report_path": self.report_path, "examples": self.examples, "base": self.base, "candidate": self.candidate,
                "delta": self.delta, "outcomes": self.outcomes, "champion": self.champion, "champion_info": self.champion_info,
                "delta_vs_champion": self.delta_vs_champion, "outcomes_vs_champion": self.outcomes_vs_champion,
                "generation": self.generation, "quantized": self.quantized, "quantization": self.quantization}

    def gated(self) -> dict[str, float]:
        """What gates read of the candidate: its metrics and those of its quantized export."""
        return self.candidate | (self.quantized or {})


@dataclass
class SuiteScores:
    """One model on one suite: its answers, per-example scores, and the suite's metrics."""

    outputs: list[str]  # answers, reasoning stripped (as vLLM's reasoning parser returns `content`)
    per_example: list[dict[str, float]]
    metrics: dict[str, float]
    margins: list[float]
    reasoning_tokens: list[int] = field(default_factory=list)  # per answer, tokens of the reasoning before it

    def reasoning_summary(self) -> dict | None:
        if not any(self.reasoning_tokens):
            return None
        counts = self.reasoning_tokens
        return {"answers_with_reasoning": sum(1 for n in counts if n), "mean_tokens": round(sum(counts) / len(counts), 1),
                "max_tokens": max(counts)}


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


def evaluate(section: EvaluationSection, model_section: ModelSection, trained: TrainResult, data: PreparedData, out_dir: str | Path,
             champion: Champion | None = None) -> EvalResult:
    """Score base, candidate and (when given) the champion on every suite; write report.json with every example's
    outputs and scores."""
    result = score_base_and_candidate(section, model_section, trained, data, out_dir)
    return compare_with_champion(result, section, data, champion, out_dir, trained.adapter_path)


def score_base_and_candidate(section: EvaluationSection, model_section: ModelSection, trained: TrainResult, data: PreparedData,
                             out_dir: str | Path) -> EvalResult:
    """The base model and the candidate on the same rows; kept apart from the champion, which changes when another
    version is promoted while these scores stay valid."""
    from peft import PeftModel

    from training.models import load_saved_tokenizer

    suites = _suites(section, data)
    tokenizer = load_saved_tokenizer(trained.adapter_path)  # the tokenizer training used, template and render settings included
    model = load_model(trained.base.path, trained.base.revision, trust_remote_code=model_section.trust_remote_code, tokenizer=tokenizer)
    scores = {"base": score_model(model, tokenizer, section, suites)}
    model = PeftModel.from_pretrained(model, trained.adapter_path).eval()
    scores["candidate"] = score_model(model, tokenizer, section, suites)
    return _write_report(section, suites, scores, None, Path(out_dir) / "report.json")


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
    champion_info, champion_scores = _score_champion(champion, section, suites)
    scores = {"base": result.scores["base"], "candidate": result.scores["candidate"]}
    if champion_scores is not None:
        scores["champion"] = champion_scores
    return _write_report(section, suites, scores, champion_info, Path(out_dir) / "report.json")


def _exported_from(champion: Champion, adapter_dir: Path) -> bool:
    manifest = Path(champion.path) / "manifest.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not (manifest.is_file() and weights.is_file()):
        return False
    shipped = json.loads(manifest.read_text()).get("files", {}).get("adapter/adapter_model.safetensors")
    return shipped == sha256_file(weights)


def _suites(section: EvaluationSection, data: PreparedData) -> list[tuple[EvalSuite, list[dict]]]:
    return [(suite, suite_rows(suite, data, section.max_samples)) for suite in section.suites]


def score_model(model, tokenizer, section: EvaluationSection, suites: list[tuple[EvalSuite, list[dict]]]) -> ModelScores:
    safety, probes = _safety(model, tokenizer, section, suites)
    throughput: dict = {}
    scored = [score_suite(model, tokenizer, suite, rows, section, throughput) for suite, rows in suites]
    if throughput.get("seconds"):
        throughput |= {"tokens_per_s": round(throughput["tokens"] / throughput["seconds"], 1), "device": str(model.device),
                       "batch_size": section.generation.batch_size}
    return ModelScores(scored, safety, probes, throughput)


def _score_champion(champion: Champion, section: EvaluationSection, suites) -> tuple[dict, ModelScores | None]:
    """The production artifact's merged model with its own tokenizer and chat template, on the same rows."""
    from training.models import load_saved_tokenizer

    model_dir = Path(champion.path) / "model"
    if not (model_dir / "config.json").is_file():
        reason = f"production version {champion.version} has no merged model ({model_dir}); not compared"
        log.warning(reason)
        return {**champion.to_dict(), "evaluated": False, "reason": reason}, None
    tokenizer = load_saved_tokenizer(model_dir)
    scores = score_model(load_model(str(model_dir)), tokenizer, section, suites)
    return {**champion.to_dict(), "evaluated": True}, scores


def _write_report(section: EvaluationSection, suites, scores: dict[str, ModelScores], champion_info: dict | None, path: Path) -> EvalResult:
    base, candidate, champion = scores["base"], scores["candidate"], scores.get("champion")
    result = EvalResult(report_path=str(path), examples={suite.name: len(rows) for suite, rows in suites},
                        base=base.metrics(suites), candidate=candidate.metrics(suites),
                        champion=champion.metrics(suites) if champion else None, champion_info=champion_info, scores=scores,
                        generation={name: model.generation for name, model in scores.items()})
    report_suites = {}
    for i, (suite, rows) in enumerate(suites):
        examples = compare_examples(suite, rows, base.suites[i], candidate.suites[i], champion.suites[i] if champion else None)
        result.outcomes[suite.name] = _tally(examples, "outcome")
        report_suites[suite.name] = {"examples": len(rows), "base": base.suites[i].metrics, "candidate": candidate.suites[i].metrics,
                                     "outcomes": result.outcomes[suite.name], "per_example": examples,
                                     "reasoning": {who: scores.suites[i].reasoning_summary() for who, scores in scores.items()}}
        if champion:
            result.outcomes_vs_champion[suite.name] = _tally(examples, "outcome_vs_champion")
            report_suites[suite.name] |= {"champion": champion.suites[i].metrics, "outcomes_vs_champion": result.outcomes_vs_champion[suite.name]}
    safety = {}
    if section.safety.enabled:
        safety = {"base": base.safety, "candidate": candidate.safety, "per_probe": [
            {"kind": b["kind"], "prompt": b["prompt"], "variants": b.get("variants"), "base_answer": b["answer"],
             "candidate_answer": c["answer"], "base_safe": b["safe"], "candidate_safe": c["safe"]}
            | ({"champion_answer": ch["answer"], "champion_safe": ch["safe"]} if ch else {})
            for b, c, ch in zip(base.probes, candidate.probes, champion.probes if champion else [None] * len(base.probes), strict=True)]}
        if champion:
            safety["champion"] = champion.safety
    atomic_write_json(path, {**result.to_dict(), "metrics_higher_is_better": METRIC_DIRECTIONS, "suites": report_suites, SAFETY_SUITE: safety})
    log.info("evaluation: base %s, candidate %s, champion %s", result.base, result.candidate, result.champion)
    return result


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
                throughput: dict | None = None) -> SuiteScores:
    """The suite's metrics for one model: generation metrics on its greedy answers, the others on the references."""
    batch_size = section.generation.batch_size
    conversations = [conversation_of(row) for row in rows]
    references = [c[-1]["content"] for c in conversations]
    outputs: list[str] = []
    reasoning_tokens: list[int] = []
    if any(m in GENERATION for m in suite.metrics):
        generation = section.generation
        outputs = generate(model, tokenizer, conversations, generation.max_new_tokens, batch_size, generation.sampling(), generation.seed,
                           throughput, reasoning_tokens)
    options = MetricOptions(json_schema=suite.check_json_schema() if suite.json_schema is not None else None, regex=suite.regex)
    metrics, per_example = score_outputs(suite.metrics, outputs, references, options) if outputs else ({}, [{} for _ in rows])
    if {"eval_loss", "perplexity"} & set(suite.metrics):
        loss = eval_loss(model, tokenizer, conversations, batch_size)
        metrics.update({k: v for k, v in (("eval_loss", loss), ("perplexity", math.exp(loss))) if k in suite.metrics})
    margins: list[float] = []
    if set(PREFERENCE_METRICS) & set(suite.metrics):
        margins = preference_margins(model, tokenizer, rows, batch_size)
        metrics.update({k: v for k, v in (("preference_accuracy", sum(m > 0 for m in margins) / len(margins)),
                                          ("preference_margin", sum(margins) / len(margins))) if k in suite.metrics})
    return SuiteScores(outputs, per_example, {m: metrics[m] for m in suite.metrics}, margins, reasoning_tokens)



def compare_examples(suite: EvalSuite, rows: list[dict], base: SuiteScores, candidate: SuiteScores,
                     champion: SuiteScores | None = None) -> list[dict]:
    """Every example with each model's outputs and scores, and whether the candidate won, lost or tied against the
    base (and the champion) on the suite's first metric that scores each example (a generation metric, or the
    preference margin)."""
    primary = next((m for m in suite.metrics if m in (base.per_example[0] if base.per_example else {})
                    or (m in PREFERENCE_METRICS and base.margins)), None)  # the first metric scored per example
    examples = []
    for i, row in enumerate(rows):
        conversation = conversation_of(row)
        example = {"index": i, "prompt": conversation[-2]["content"], "reference": conversation[-1]["content"]}
        for who, scores in (("base", base), ("candidate", candidate), ("champion", champion)):
            if scores is not None and scores.outputs:
                example.update({f"{who}_output": scores.outputs[i], f"{who}_scores": scores.per_example[i]})
                if scores.reasoning_tokens and scores.reasoning_tokens[i]:
                    example[f"{who}_reasoning_tokens"] = scores.reasoning_tokens[i]
            if scores is not None and scores.margins:
                example[f"{who}_preference_margin"] = round(scores.margins[i], 4)
        if base.margins:
            example["rejected"] = row["rejected"][-1]["content"]
        example["outcome"] = _outcome(primary, i, base, candidate)
        if champion is not None:
            example["outcome_vs_champion"] = _outcome(primary, i, champion, candidate)
        examples.append(example)
    return examples


def _outcome(primary: str | None, i: int, reference: SuiteScores, candidate: SuiteScores) -> str:
    if primary in PREFERENCE_METRICS:
        before, after = reference.margins[i], candidate.margins[i]
    elif primary:
        before, after = reference.per_example[i][primary], candidate.per_example[i][primary]
    else:
        before = after = 0.0
    return "win" if after > before else "loss" if after < before else "tie"
