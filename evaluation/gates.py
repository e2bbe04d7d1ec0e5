"""Gate decisions: every gate with its value, threshold and verdict; any failure blocks export."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from recipes.schema import Gate


class GateRejected(RuntimeError):
    """The candidate failed at least one gate; the message names each failing gate."""


@dataclass
class GateResult:
    metric: str
    kind: str  # min | max | min_delta_vs_base | max_delta_vs_base | no_regression_vs
    at_least: bool  # the value must be >= the threshold (else <=)
    threshold: float
    value: float  # the compared value: the metric, or candidate minus base
    passed: bool

    def describe(self) -> str:
        op = ">=" if self.at_least else "<="
        what = self.metric if self.kind in ("min", "max") else f"{self.metric} - base"
        rule = " (no regression)" if self.kind == "no_regression_vs" else ""
        return f"{what} = {self.value:.4f} {'passes' if self.passed else 'fails'} {op} {self.threshold:g}{rule}"


@dataclass
class GateDecision:
    passed: bool
    results: list[GateResult]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "results": [asdict(r) | {"description": r.describe()} for r in self.results]}

    def failure_message(self) -> str:
        failed = [r.describe() for r in self.results if not r.passed]
        return f"{len(failed)} of {len(self.results)} gates failed: " + "; ".join(failed)


def decide(gates: list[Gate], candidate: dict[str, float], base: dict[str, float]) -> GateDecision:
    """Apply each gate to the candidate's metrics (and the base model's, for deltas)."""
    results = [_apply(gate, candidate, base) for gate in gates]
    return GateDecision(passed=all(r.passed for r in results), results=results)


def _apply(gate: Gate, candidate: dict[str, float], base: dict[str, float]) -> GateResult:
    """A metric that was not measured (e.g. no probe of its kind) is NaN and fails its gate."""
    value = candidate.get(gate.metric, math.nan)
    if gate.kind not in ("min", "max"):
        value = value - base.get(gate.metric, math.nan)
    at_least = gate.kind.startswith("min") or (gate.kind == "no_regression_vs" and gate.higher_is_better)
    if math.isnan(value):
        passed = False
    else:
        passed = value >= gate.threshold if at_least else value <= gate.threshold
    return GateResult(metric=gate.metric, kind=gate.kind, at_least=at_least, threshold=gate.threshold, value=value, passed=passed)
