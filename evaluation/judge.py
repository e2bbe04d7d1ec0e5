"""LLM-as-judge: pairwise verdicts (both orders, to cancel position bias) and rubric scores, through the endpoint client.

A verdict is read from the judge's reply, never guessed: the last [[A]]/[[B]]/[[C]] (pairwise) or [[N]] within the
scale (rubric). A reply without one is counted as unparseable and shown; it scores nothing (NaN), so it neither
helps nor hurts a model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from recipes.schema import JudgeSection

PAIRWISE_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RUBRIC_VERDICT = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
# The candidate's outcome from its verdicts in the two orders (candidate as A, then as B): a verdict that follows the
# position, not the answer, is a tie; a tie in one order and a win in the other is a win.
CANDIDATE_FIRST = {"A": "win", "B": "loss", "C": "tie"}
CANDIDATE_SECOND = {"A": "loss", "B": "win", "C": "tie"}
POINTS = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def pairwise_verdict(reply: str) -> str | None:
    found = PAIRWISE_VERDICT.findall(reply)
    return found[-1] if found else None


def rubric_verdict(reply: str, scale: int) -> float | None:
    """The score normalised to 0..1, or None when the reply holds no score within 1..scale."""
    found = RUBRIC_VERDICT.findall(reply)
    if not found:
        return None
    score = float(found[-1])
    return (score - 1) / (scale - 1) if 1 <= score <= scale else None


def combined_outcome(first: str | None, second: str | None) -> str | None:
    """The candidate's outcome over both orders; None when either verdict was unparseable."""
    if first is None or second is None:
        return None
    outcomes = {CANDIDATE_FIRST[first], CANDIDATE_SECOND[second]}
    if outcomes == {"win"} or outcomes == {"win", "tie"}:
        return "win"
    if outcomes == {"loss"} or outcomes == {"loss", "tie"}:
        return "loss"
    return "tie"  # both ties, or a win and a loss: the verdict followed the position


@dataclass
class Judged:
    """Per row: what the judge was asked and answered, and the score it gives."""

    scores: list[float]  # NaN where unparseable
    records: list[dict]

    @property
    def unparseable(self) -> int:
        return sum(math.isnan(s) for s in self.scores)


class Judge:
    def __init__(self, section: JudgeSection, client):
        self.section, self.client = section, client

    def rubric(self, questions: list[str], references: list[str], answers: list[str]) -> Judged:
        """Each answer graded against the rubric: (score - 1) / (scale - 1), NaN when the reply holds no score."""
        section = self.section
        prompts = [section.rubric_prompt.format(rubric=section.rubric, question=q, reference=r, answer=a, scale=section.scale)
                   for q, r, a in zip(questions, references, answers, strict=True)]
        replies = self._ask(prompts)
        scores = [rubric_verdict(reply, section.scale) for reply in replies]
        records = [{"prompt": p, "reply": reply, "score": s} for p, reply, s in zip(prompts, replies, scores, strict=True)]
        return Judged([math.nan if s is None else s for s in scores], records)

    def pairwise(self, questions: list[str], references: list[str], candidate: list[str], other: list[str]) -> Judged:
        """The candidate against another model's answers, each pair asked in both orders: 1 win, 0.5 tie, 0 loss."""
        fill = self.section.pairwise_prompt.format
        first = [fill(question=q, reference=r, answer_a=c, answer_b=o) for q, r, c, o in zip(questions, references, candidate, other, strict=True)]
        second = [fill(question=q, reference=r, answer_a=o, answer_b=c) for q, r, c, o in zip(questions, references, candidate, other, strict=True)]
        replies = self._ask(first + second)
        scores, records = [], []
        for i in range(len(first)):
            verdicts = pairwise_verdict(replies[i]), pairwise_verdict(replies[len(first) + i])
            outcome = combined_outcome(*verdicts)
            scores.append(math.nan if outcome is None else POINTS[outcome])
            records.append({"candidate_first": {"prompt": first[i], "reply": replies[i], "verdict": verdicts[0]},
                            "candidate_second": {"prompt": second[i], "reply": replies[len(first) + i], "verdict": verdicts[1]},
                            "outcome": outcome or "unparseable"})
        return Judged(scores, records)

    def _ask(self, prompts: list[str]) -> list[str]:
        return [reply.content for reply in self.client.complete([[{"role": "user", "content": p}] for p in prompts])]


def summary(judged: Judged) -> dict:
    """Counts of a pairwise comparison for tables: wins, ties, losses, unparseable, win rate (ties half)."""
    outcomes = [r["outcome"] for r in judged.records]
    scored = [s for s in judged.scores if not math.isnan(s)]
    return {"win": outcomes.count("win"), "tie": outcomes.count("tie"), "loss": outcomes.count("loss"),
            "unparseable": judged.unparseable, "win_rate": sum(scored) / len(scored) if scored else math.nan}
