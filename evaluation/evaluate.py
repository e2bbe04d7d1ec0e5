"""The evaluation stage: base model and candidate (base + adapter) on the same held-out rows.

The candidate is evaluated with the adapter on the base in 16/32-bit, which is exactly what export
merges and ships (for QLoRA too: the 4-bit base is a training device, not the deliverable).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from data_prep.files import atomic_write_json
from data_prep.formats import conversation_of
from data_prep.prepare import PreparedData, read_jsonl
from evaluation.generate import eval_loss, generate, load_model, preference_margins
from recipes.schema import METRICS, EvaluationSection, ModelSection
from training.train import TrainResult

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    report_path: str
    examples: int
    base: dict[str, float]
    candidate: dict[str, float]

    @property
    def delta(self) -> dict[str, float]:
        return {k: self.candidate[k] - self.base[k] for k in self.candidate}

    def to_dict(self) -> dict:
        return {"report_path": self.report_path, "examples": self.examples, "base": self.base, "candidate": self.candidate, "delta": self.delta}


def exact_match(predictions: list[str], references: list[str]) -> list[bool]:
    return [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]


def evaluate(section: EvaluationSection, model_section: ModelSection, trained: TrainResult, data: PreparedData, out_dir: str | Path) -> EvalResult:
    """Score base and candidate on the held-out rows; write report.json with per-example outputs."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    rows = read_jsonl(data.eval_path)[: section.max_samples]
    conversations = [conversation_of(row) for row in rows]
    preference_rows = [row for row in rows if "chosen" in row]
    references = [messages[-1]["content"] for messages in conversations]
    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_path)  # the tokenizer training used, template included

    model = load_model(trained.base.path, trained.base.revision, trust_remote_code=model_section.trust_remote_code, tokenizer=tokenizer)
    base_out, base_metrics, base_margins = _score(model, tokenizer, conversations, references, preference_rows, section)
    model = PeftModel.from_pretrained(model, trained.adapter_path).eval()
    cand_out, cand_metrics, cand_margins = _score(model, tokenizer, conversations, references, preference_rows, section)

    examples = [
        {"index": i, "prompt": c[-2]["content"], "reference": ref, "base_output": b, "candidate_output": o,
         "base_exact": b.strip() == ref.strip(), "candidate_exact": o.strip() == ref.strip()}
        for i, (c, ref, b, o) in enumerate(zip(conversations, references, base_out, cand_out, strict=True))
    ]
    preference_index = [i for i, row in enumerate(rows) if "chosen" in row]
    for i, base_margin, cand_margin in zip(preference_index, base_margins, cand_margins, strict=True):
        examples[i].update(rejected=rows[i]["rejected"][-1]["content"], base_preference_margin=round(base_margin, 4),
                           candidate_preference_margin=round(cand_margin, 4))
    result = EvalResult(report_path=str(out_dir / "report.json"), examples=len(rows), base=base_metrics, candidate=cand_metrics)
    atomic_write_json(Path(result.report_path), {**result.to_dict(), "metrics_higher_is_better": METRICS, "per_example": examples})
    log.info("eval on %d rows: base %s, candidate %s", len(rows), base_metrics, cand_metrics)
    return result


def _score(model, tokenizer, conversations, references, preference_rows, section: EvaluationSection):
    """(outputs, metrics, preference margins) of one model; preference metrics when the eval rows are preference rows."""
    batch_size = section.generation.batch_size
    outputs = generate(model, tokenizer, conversations, section.generation.max_new_tokens, batch_size)
    matches = exact_match(outputs, references)
    metrics = {"exact_match": sum(matches) / len(matches), "eval_loss": eval_loss(model, tokenizer, conversations, batch_size)}
    margins = preference_margins(model, tokenizer, preference_rows, batch_size) if preference_rows else []
    if margins:
        metrics["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        metrics["preference_margin"] = sum(margins) / len(margins)
    return outputs, metrics, margins
