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
    kind: str  # min | max | min_delta_vs_base | max_delta_vs_base
    threshold: float
    value: float  # the compared value: the metric, or candidate minus base
    passed: bool

    def describe(self) -> str:
        op = ">=" if self.kind.startswith("min") else "<="
        what = f"{self.metric} - base" if "delta" in self.kind else self.metric
        return f"{what} = {self.value:.4f} {'passes' if self.passed else 'fails'} {op} {self.threshold:g}"


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
    value = candidate[gate.metric]
    if "delta" in gate.kind:
        value = value - base[gate.metric]
    if math.isnan(value):
        passed = False
    elif gate.kind.startswith("min"):
        passed = value >= gate.threshold
    else:
        passed = value <= gate.threshold
    return GateResult(metric=gate.metric, kind=gate.kind, threshold=gate.threshold, value=value, passed=passed)
