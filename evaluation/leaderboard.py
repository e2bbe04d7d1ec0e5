"""Several base models trained with one recipe, ranked: which is best for the task, at what cost.

Plain functions over each candidate's evaluation, gate decision and cost, so the ranking is tested without
training anything; flows/compare.py fills them in.
"""
from __future__ import annotations

from dataclasses import asdict

from evaluation.confidence import RowStatistic, describe, interval, within_noise
from evaluation.costs import self_hosted_per_1k
from evaluation.evaluate import EvalResult
from evaluation.gates import GateDecision
from recipes.schema import METRIC_DIRECTIONS, CompareSection

API = "hosted API"


def entry(base: str, run_dir: str, evaluation: EvalResult, decision: GateDecision, training: dict, costs: dict,
          objective: str | None = None) -> dict:
    """One row of the leaderboard: the candidate's metrics, their deltas against production, gates, time and cost;
    the objective's per-row scores (for within-noise marks) and the contenders scored on the same rows."""
    return {"kind": "candidate", "base": base, "run_dir": run_dir, "metrics": evaluation.candidate, "base_metrics": evaluation.base,
            "objective_rows": _rows(evaluation, "candidate", objective), "bootstrap": evaluation.bootstrap,
            "confidence": evaluation.confidence, "apis": {name: api_entry(name, evaluation, costs, objective)
                                                          for name in evaluation.contenders},
            "champion": evaluation.champion, "delta_vs_champion": evaluation.delta_vs_champion,
            "objective_vs_champion": evaluation.interval("champion", objective) if objective and evaluation.champion else None,
            "champion_info": evaluation.champion_info, "gates_passed": decision.passed,
            "failed_gates": [r.describe() for r in decision.results if not r.passed],
            "train_s": training.get("runtime_s"), "train_steps": training.get("steps"), "backend": training.get("backend"),
            "gpu_slot": training.get("gpu_slot"),
            "cost_usd": costs["run"]["usd"], "gpu_s": costs["run"]["gpu_s"], "cpu_s": costs["run"]["cpu_s"],
            "usd_per_1k_requests": self_hosted_per_1k(costs.get("serving"))}


def api_entry(name: str, evaluation: EvalResult, costs: dict, objective: str | None) -> dict:
    """A contender as a leaderboard row: its metrics on the same rows and its price per 1,000 requests."""
    priced = next((row for row in (costs.get("contenders") or {}).get("rows", []) if row["model"] == name), {})
    return {"kind": API, "base": name, "run_dir": None, "metrics": evaluation.contenders[name], "base_metrics": {},
            "objective_rows": _rows(evaluation, name, objective), "champion": None, "delta_vs_champion": None,
            "champion_info": None, "gates_passed": None, "failed_gates": [], "train_s": None, "train_steps": None, "backend": None,
            "gpu_slot": None, "cost_usd": None, "gpu_s": None, "cpu_s": None, "usd_per_1k_requests": priced.get("usd_per_1k_requests"),
            "model": evaluation.contender_info[name]["model"]}


def _rows(evaluation: EvalResult, who: str, objective: str | None) -> dict | None:
    found = evaluation.statistics.get(who, {}).get(objective) if objective else None
    return asdict(found) if found is not None else None


def with_apis(entries: list[dict], apis: list[str]) -> list[dict]:
    """The candidates plus the named contenders (`ftpipe compare --api NAME`), each once: as the first candidate's
    evaluation scored it (every candidate asks it the same rows)."""
    rows = list(entries)
    for name in apis:
        scored = next((e["apis"][name] for e in entries if name in e.get("apis", {})), None)
        if scored is None:
            raise ValueError(f"--api {name}: no candidate's evaluation scored a contender of that name "
                             f"(evaluation.contenders: {', '.join(sorted({n for e in entries for n in e.get('apis', {})})) or 'none'})")
        rows.append(scored)
    return rows


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
        if row.get("kind") == API:
            why_not = "a hosted API, for reference: not a candidate"
        elif value is None:
            why_not = f"no {objective} measured (add it to an evaluation suite)"
        elif section.require_gates and not row["gates_passed"]:
            why_not = "failed gates: " + "; ".join(row["failed_gates"])
        ranked.append({**row, "objective": objective, "objective_value": value, "eligible": why_not is None, "why_not": why_not})
    # eligible candidates and the APIs first, then by the objective (better first), then cheaper, then faster; the name
    # breaks exact ties
    ranked.sort(key=lambda r: (not (r["eligible"] or r.get("kind") == API and r["objective_value"] is not None),
                               -sign * (r["objective_value"] if r["objective_value"] is not None else 0.0),
                               r["cost_usd"] if r["cost_usd"] is not None else 0.0, r["train_s"] or 0.0, r["base"]))
    ranked = [{**row, "rank": i} for i, row in enumerate(ranked, start=1)]
    return _against_best(ranked)


def _against_best(ranked: list[dict]) -> list[dict]:
    """Each row's objective minus the best candidate's on the same rows, with its paired interval: `within noise`
    when the interval holds zero (the rows cannot tell the two apart)."""
    best = best_of(ranked)
    for row in ranked:
        row["vs_best"], row["is_best"] = None, row is best
        if best is None or row is best or not (row.get("objective_rows") and best.get("objective_rows")):
            continue
        settings = best.get("bootstrap") or {"samples": 1000, "seed": 0}
        row["vs_best"] = interval(RowStatistic(**row["objective_rows"]), RowStatistic(**best["objective_rows"]),
                                  best.get("confidence", 0.95), settings["samples"], settings["seed"])
    return ranked


def vs_best_cell(row: dict) -> str:
    if row.get("is_best"):
        return "best"
    found = row.get("vs_best")
    if found is None:
        return "-"
    return ("within noise " if within_noise(found) else "") + describe(found)


def best_of(ranked: list[dict]) -> dict | None:
    return next((row for row in ranked if row["eligible"]), None)


def summary_table(ranked: list[dict]) -> list[dict]:
    """The leaderboard artifact's rows, best first: one per model."""
    return [{"rank": r["rank"], "base": r["base"], r["objective"]: _round(r["objective_value"]), "vs best": vs_best_cell(r),
             "delta vs production": _round((r["delta_vs_champion"] or {}).get(r["objective"])),
             "gates": "-" if r.get("kind") == API else "passed" if r["gates_passed"] else "FAILED",
             "eligible": "yes" if r["eligible"] else r["why_not"], "train s": r["train_s"], "GPU s": r["gpu_s"], "CPU s": r["cpu_s"],
             "cost USD": r["cost_usd"] if r["cost_usd"] is not None else "-" if r.get("kind") == API else "not priced",
             "USD per 1k requests": r.get("usd_per_1k_requests")} for r in ranked]


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
