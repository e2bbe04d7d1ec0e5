"""Gate decisions: every gate with its value, threshold and verdict; any failure blocks export."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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
    value: float  # the compared value: the metric, or candidate minus the reference
    passed: bool
    note: str = ""

    def describe(self) -> str:
        op = ">=" if self.at_least else "<="
        what = f"{self.metric} - {self.reference}" if self.reference else self.metric
        rule = " (no regression)" if self.kind == "no_regression_vs" else ""
        if self.note:
            return f"{what} {op} {self.threshold:g}{rule}: {self.note}"
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


NO_CHAMPION = "passes: no other model in production (none yet, or it is this very adapter)"


def decide(gates: list[Gate], candidate: dict[str, float], base: dict[str, float], champion: dict[str, float] | None = None) -> GateDecision:
    """Apply each gate to the candidate's metrics (and the base's or champion's, for deltas). With no champion (the
    first version of a model), gates against the champion pass and say so. The candidate's quantized.<metric> (a
    quantized export) is compared with the same metric of the 16-bit candidate (unquantized), the base or the champion."""
    unquantized = {k: v for k, v in candidate.items() if not k.startswith(f"{QUANTIZED}.")}
    references = {"base": _with_quantized_names(base), "champion": _with_quantized_names(champion),
                  "unquantized": _with_quantized_names(unquantized)}
    results = [_apply(gate, candidate, references) for gate in gates]
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
