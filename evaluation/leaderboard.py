"""Several base models trained with one recipe, ranked: which is best for the task, at what cost.

Plain functions over each candidate's evaluation, gate decision and cost, so the ranking is tested without
training anything; flows/compare.py fills them in.
"""
from __future__ import annotations

from evaluation.evaluate import EvalResult
from evaluation.gates import GateDecision
from recipes.schema import METRIC_DIRECTIONS, CompareSection


def entry(base: str, run_dir: str, evaluation: EvalResult, decision: GateDecision, training: dict, costs: dict) -> dict:
    """One row of the leaderboard: the candidate's metrics, their deltas against production, gates, time and cost."""
    return {"base": base, "run_dir": run_dir, "metrics": evaluation.candidate, "base_metrics": evaluation.base,
            "champion": evaluation.champion, "delta_vs_champion": evaluation.delta_vs_champion,
            "champion_info": evaluation.champion_info, "gates_passed": decision.passed,
            "failed_gates": [r.describe() for r in decision.results if not r.passed],
            "train_s": training.get("runtime_s"), "train_steps": training.get("steps"), "backend": training.get("backend"),
            "gpu_slot": training.get("gpu_slot"),
            "cost_usd": costs["run"]["usd"], "gpu_s": costs["run"]["gpu_s"], "cpu_s": costs["run"]["cpu_s"]}


def higher_is_better(metric: str) -> bool:
    return METRIC_DIRECTIONS[metric.rpartition(".")[2]]


def rank(entries: list[dict], section: CompareSection) -> list[dict]:
    """Best first: candidates that may win (gates passed, when required) by the objective in its better direction,
    then the others. Each row gains rank, eligible and why_not; a candidate without the objective metric cannot win."""
    objective = section.objective
    sign = 1 if higher_is_better(objective) else -1
    ranked = []
    for row in entries:
        value = row["metrics"].get(objective)
        why_not = None
        if value is None:
            why_not = f"no {objective} measured (add it to an evaluation suite)"
        elif section.require_gates and not row["gates_passed"]:
            why_not = "failed gates: " + "; ".join(row["failed_gates"])
        ranked.append({**row, "objective": objective, "objective_value": value, "eligible": why_not is None, "why_not": why_not})
    # eligible first, then by the objective (better first), then cheaper, then faster; the base name breaks exact ties
    ranked.sort(key=lambda r: (not r["eligible"], -sign * (r["objective_value"] if r["objective_value"] is not None else 0.0),
                               r["cost_usd"] if r["cost_usd"] is not None else 0.0, r["train_s"] or 0.0, r["base"]))
    return [{**row, "rank": i} for i, row in enumerate(ranked, start=1)]


def best_of(ranked: list[dict]) -> dict | None:
    return ranked[0] if ranked and ranked[0]["eligible"] else None


def summary_table(ranked: list[dict]) -> list[dict]:
    """The leaderboard artifact's rows, best first: one per model."""
    return [{"rank": r["rank"], "base": r["base"], r["objective"]: _round(r["objective_value"]),
             "delta vs production": _round((r["delta_vs_champion"] or {}).get(r["objective"])),
             "gates": "passed" if r["gates_passed"] else "FAILED", "eligible": "yes" if r["eligible"] else r["why_not"],
             "train s": r["train_s"], "GPU s": r["gpu_s"], "CPU s": r["cpu_s"],
             "cost USD": r["cost_usd"] if r["cost_usd"] is not None else "not priced"} for r in ranked]


def metric_table(ranked: list[dict]) -> list[dict]:
    """Per metric, per model: the candidate's value, its base model's, and the delta against production."""
    return [{"metric": metric, "base model": r["base"], "candidate": _round(value), "before fine-tuning": _round(r["base_metrics"].get(metric)),
             "production": _round((r["champion"] or {}).get(metric)), "delta vs production": _round((r["delta_vs_champion"] or {}).get(metric))}
            for metric in sorted({m for r in ranked for m in r["metrics"]}) for r in ranked for value in [r["metrics"].get(metric)]]


def leaderboard_lines(ranked: list[dict]) -> list[str]:
    """The table `ftpipe compare` prints, best first."""
    rows = summary_table(ranked)
    if not rows:
        return ["no candidates"]
    headers = list(rows[0])
    cells = [[_text(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    return ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), *("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)]


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
