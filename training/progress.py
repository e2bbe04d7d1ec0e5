"""Training progress as a person watching the run reads it: step, loss, tokens per second and time left, from the
step lines the worker logs (at least every PROGRESS_EVERY_S seconds, see training.sft.trainer_callbacks)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

PROGRESS_EVERY_S = 3.0
# "step 12/60 loss 0.4312 lr 2.00e-03 tokens 18432" (tokens: seen by all processes so far)
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr \S+(?: tokens (\d+))?")


@dataclass(frozen=True)
class StepReport:
    step: int
    total: int
    loss: float
    tokens: int | None


def parse_step_line(line: str) -> StepReport | None:
    if not (match := STEP_LINE.match(line)):
        return None
    step, total, loss, tokens = match.groups()
    return StepReport(int(step), int(total), float(loss), int(tokens) if tokens else None)


@dataclass
class ProgressMeter:
    """Rates measured from the first report on, so model loading and tokenizing do not count as training speed."""

    first: tuple[float, StepReport] | None = None

    def describe(self, report: StepReport, now: float | None = None) -> tuple[float, str]:
        """(percent done, "step 30 of 60 · loss 0.431 · 1,850 tokens/s · about 12 s left")."""
        now = time.monotonic() if now is None else now
        self.first = self.first or (now, report)
        started, first = self.first
        parts = [f"step {report.step} of {report.total}", f"loss {report.loss:.4g}"]
        elapsed, steps = now - started, report.step - first.step
        if elapsed > 0 and steps > 0:
            if report.tokens is not None and first.tokens is not None:
                parts.append(f"{(report.tokens - first.tokens) / elapsed:,.0f} tokens/s")
            parts.append(f"about {_duration((report.total - report.step) * elapsed / steps)} left")
        return round(100 * report.step / max(report.total, 1), 1), " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
