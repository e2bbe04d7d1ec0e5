"""Paired bootstrap intervals: is a delta between two models on the same rows more than noise?

Forty held-out rows make a 0.05 delta two examples. Resampling the rows (the same resampled rows for both models,
so their per-row agreement is kept) and recomputing each model's metric gives the delta's spread; the interval is
its percentiles. Every metric is recomputed from per-row data, not averaged per row, so token-weighted losses,
perplexity and corpus-level F1 get intervals as honest as those of exact match.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass
class RowStatistic:
    """How one model's metric is recomputed on any resample of the rows.

    mean:   the mean of `values` (NaN rows, e.g. unparseable judge verdicts, are left out);
    ratio:  sum(values) / sum(weights), then `transform` (eval_loss: summed NLL over answer tokens; perplexity: exp);
    corpus: a corpus-level metric of `outputs` against `references` (label_macro_f1)."""

    kind: Literal["mean", "ratio", "corpus"]
    values: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    transform: Literal["exp"] | None = None
    metric: str | None = None  # corpus: the metric's name in evaluation.metrics.CORPUS
    outputs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.outputs) if self.kind == "corpus" else len(self.values)

    def on(self, rows: np.ndarray) -> np.ndarray:
        """The metric on each resample: rows is (resamples, n) row indices; returns (resamples,)."""
        if self.kind == "mean":
            taken = np.asarray(self.values, dtype=float)[rows]
            counted = ~np.isnan(taken)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(counted, taken, 0.0).sum(axis=1) / counted.sum(axis=1)
        if self.kind == "ratio":
            values, weights = np.asarray(self.values, dtype=float), np.asarray(self.weights, dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = values[rows].sum(axis=1) / weights[rows].sum(axis=1)
            return np.exp(ratio) if self.transform == "exp" else ratio
        from evaluation.metrics import CORPUS

        score = CORPUS[self.metric]
        return np.array([score([self.outputs[i] for i in sample], [self.references[i] for i in sample]) for sample in rows])

    def value(self) -> float:
        return float(self.on(np.arange(self.rows)[None, :])[0])


def resamples(rows: int, samples: int, seed: int) -> np.ndarray:
    """(samples, rows) row indices drawn with replacement from a fixed seed: every model and metric of a suite is
    resampled alike, which is what makes the intervals paired."""
    return np.random.default_rng(seed).integers(0, rows, size=(samples, rows))


def interval(candidate: RowStatistic, reference: RowStatistic | None, confidence: float, samples: int, seed: int) -> dict | None:
    """The candidate's metric (reference None) or its delta against the reference on the same rows, with the
    percentile bootstrap interval at `confidence`. None when the two were not scored on the same rows."""
    if reference is not None and reference.rows != candidate.rows or candidate.rows == 0:
        return None
    drawn = resamples(candidate.rows, samples, seed)
    spread = candidate.on(drawn) - (reference.on(drawn) if reference is not None else 0.0)
    spread = spread[~np.isnan(spread)]
    point = candidate.value() - (reference.value() if reference is not None else 0.0)
    if not len(spread) or math.isnan(point):
        return None
    tail = (1 - confidence) / 2
    low, high = np.quantile(spread, [tail, 1 - tail])
    return {"value": round(point, 6), "low": round(float(low), 6), "high": round(float(high), 6), "confidence": confidence,
            "samples": samples, "rows": candidate.rows}


def within_noise(found: dict | None) -> bool:
    """The interval holds zero: the data cannot tell the two models apart on this metric."""
    return found is not None and found["low"] <= 0 <= found["high"]


def describe(found: dict | None) -> str:
    """`+0.0500 [-0.0250, +0.1250]`, or `-` when there is no interval."""
    if found is None:
        return "-"
    return f"{found['value']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]"
