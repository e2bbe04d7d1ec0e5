"""Markdown of an evaluation result (EvalResult.to_dict()), shared by the approval request and the model card."""
from __future__ import annotations

import math

from evaluation.confidence import describe, within_noise


def others(evaluation: dict) -> list[str]:
    """The models the candidate is compared with, in table order: base, champion, then the contenders."""
    return ["base", *(["champion"] if evaluation.get("champion") else []), *evaluation.get("contenders", {})]


def metrics_of(evaluation: dict, who: str) -> dict:
    return evaluation["contenders"][who] if who in evaluation.get("contenders", {}) else evaluation.get(who) or {}


def delta_cell(evaluation: dict, who: str, metric: str) -> str:
    """`+0.0500 [-0.0250, +0.1250]`, marked `(noise)` when the interval holds zero; the bare delta without an interval."""
    found = ((evaluation.get("intervals") or {}).get(f"{evaluation.get('confidence', 0.95):g}") or {}).get(who, {}).get(metric)
    if found is not None:
        if found["low"] == found["high"] == 0:
            return describe(found) + " (identical)"
        return describe(found) + (" (noise)" if within_noise(found) else "")
    mine, theirs = evaluation["candidate"].get(metric), metrics_of(evaluation, who).get(metric)
    return "-" if mine is None or theirs is None else f"{mine - theirs:+.4f}"


def metrics_markdown(evaluation: dict) -> str:
    """The metric table of the approval request and the model card: every model's value and the candidate's delta
    against each, with its paired bootstrap interval."""
    compared = others(evaluation)
    level = evaluation.get("confidence", 0.95)
    head = "| metric | candidate | " + " | ".join(f"{who} | delta vs {who}" for who in compared) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(compared)]
    for metric, value in evaluation["candidate"].items():
        cells = [metric, _number(value)]
        for who in compared:
            cells += [_number(metrics_of(evaluation, who).get(metric)), delta_cell(evaluation, who, metric)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nDeltas are the candidate minus the other model on the same rows, with the {level:.0%} paired bootstrap "
                 "interval; (noise) marks an interval that holds zero: the rows cannot tell the two apart; (identical): the same score on every row.")
    return "\n".join(lines)


def pairwise_markdown(evaluation: dict) -> str:
    """The judge's pairwise verdicts: the candidate against each model, both orders asked."""
    pairwise = evaluation.get("pairwise") or {}
    if not pairwise:
        return ""
    lines = ["| candidate vs | suite | wins | ties | losses | unparseable | win rate (ties half) |", "|---|---|---|---|---|---|---|"]
    for other, by_suite in pairwise.items():
        for suite, s in by_suite.items():
            found = s.get("interval")
            rate = (f"{found['value']:.4f} [{found['low']:.4f}, {found['high']:.4f}]" if found else _number(s["win_rate"]))
            lines.append(f"| {other} | {suite} | {s['win']} | {s['tie']} | {s['loss']} | {s['unparseable']} | {rate} |")
    return "\n".join(lines)


def champion_line(evaluation: dict) -> str:
    info = evaluation.get("champion_info")
    if info is None:
        return "Champion: none (the registry has no production model for this name yet)."
    if not info["evaluated"]:
        return f"Champion: {info['reason']}."
    return f"Champion: production version {info['version']} of {info['model']}, evaluated on the same rows."


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
