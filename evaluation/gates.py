"""Gate decisions: every gate with its value, threshold and verdict; any failure blocks export."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from recipes.schema import QUANTIZED, Gate


class GateRejected(RuntimeError):
    """The candidate failed at least one gate; the message names each failing gate."""


@dataclass
class GateResult:
    metric: str
    kind: str  # one of recipes.schema.GATE_KINDS
    reference: str | None  # None (absolute threshold), base or champion
    at_least: bool  # the value must be >= the threshold (else <=)
    threshold: float
    value: float  # the compared value: the metric, or candidate minus the reference (with confidence: the interval's bound)
    passed: bool
    note: str = ""
    interval: dict | None = None  # with confidence: the bootstrap interval whose bound was compared

    def describe(self) -> str:
        op = ">=" if self.at_least else "<="
        what = f"{self.metric} - {self.reference}" if self.reference else self.metric
        rule = " (no regression)" if self.kind == "no_regression_vs" else ""
        if self.note:
            return f"{what} {op} {self.threshold:g}{rule}: {self.note}"
        verdict = f"{'passes' if self.passed else 'fails'} {op} {self.threshold:g}{rule}"
        if self.interval is not None:
            found = self.interval
            bound = "lower" if self.at_least else "upper"
            return (f"{what} = {found['value']:.4f}, {found['confidence']:.0%} interval [{found['low']:.4f}, {found['high']:.4f}]: "
                    f"its {bound} bound {self.value:.4f} {verdict}")
        return f"{what} = {self.value:.4f} {verdict}"


@dataclass
class GateDecision:
    passed: bool
    results: list[GateResult]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "results": [asdict(r) | {"description": r.describe()} for r in self.results]}

    def failure_message(self) -> str:
        failed = [r.describe() for r in self.results if not r.passed]
        return f"{len(failed)} of {len(self.results)} gates failed: " + "; ".join(failed)


NO_CHAMPION = "passes: no other model in production (none yet, or it is this very adapter)"


IntervalOf = Callable[[str | None, str, float], dict | None]  # (versus model or None, metric, confidence) -> interval


def decide(gates: list[Gate], candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None = None,
           interval_of: IntervalOf | None = None) -> GateDecision:
    """Apply each gate to the candidate's metrics (and the base's or champion's, for deltas). With no champion (the
    first version of a model), gates against the champion pass and say so. The candidate's quantized.<metric> (a
    quantized export) is compared with the same metric of the 16-bit candidate (unquantized), the base or the champion.
    A gate with `confidence` compares the bound of the bootstrap interval (interval_of, EvalResult.interval) instead
    of the point value: the difference must be more than noise."""
    unquantized = {k: v for k, v in candidate.items() if not k.startswith(f"{QUANTIZED}.")}
    references = {"base": _with_quantized_names(base), "champion": _with_quantized_names(champion),
                  "unquantized": _with_quantized_names(unquantized)}
    results = [_apply(gate, candidate, references) if gate.confidence is None else _apply_with_confidence(gate, references, interval_of)
               for gate in gates]
    return GateDecision(passed=all(r.passed for r in results), results=results)


def _with_quantized_names(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """A reference model's metrics also under quantized.<metric>, to compare a quantized export with."""
    return None if metrics is None else metrics | {f"{QUANTIZED}.{k}": v for k, v in metrics.items()}


def _apply(gate: Gate, candidate: dict[str, float], references: dict[str, dict[str, float] | None]) -> GateResult:
    """A metric that was not measured (e.g. no probe of its kind) is NaN and fails its gate."""
    at_least = gate.kind.startswith("min") or (gate.kind == "no_regression_vs" and gate.higher_is_better)
    result = GateResult(metric=gate.metric, kind=gate.kind, reference=gate.reference, at_least=at_least, threshold=gate.threshold,
                        value=candidate.get(gate.metric, math.nan), passed=False)
    if gate.reference is not None:
        reference = references[gate.reference]
        if reference is None:
            result.passed, result.value, result.note = True, math.nan, NO_CHAMPION
            return result
        result.value -= reference.get(gate.metric, math.nan)
    if not math.isnan(result.value):
        result.passed = result.value >= gate.threshold if at_least else result.value <= gate.threshold
    return result


def _apply_with_confidence(gate: Gate, references: dict[str, dict[str, float] | None], interval_of: IntervalOf | None) -> GateResult:
    """The interval's lower bound must meet a minimum, its upper bound a maximum; no interval fails the gate."""
    result = _apply(gate, {}, references)  # direction and the no-champion rule; its value is replaced below
    if result.note == NO_CHAMPION:
        return result
    found = interval_of(gate.reference, gate.metric, gate.confidence) if interval_of is not None else None
    if found is None:
        result.passed, result.note = False, f"no {gate.confidence:.0%} interval ({gate.metric} has no per-row scores for this comparison)"
        return result
    result.interval, result.value = found, found["low"] if result.at_least else found["high"]
    result.passed = result.value >= gate.threshold if result.at_least else result.value <= gate.threshold
    return result
