"""What Prefect orchestration costs a quickstart run: the flow's wall time against the stages' own work.

    python bench/pipeline_overhead.py [--set path=value ...]

Runs the finetune flow in this process as `ftpipe run` does, on Prefect's embedded server (a fresh Prefect home, so nothing is
cached), with every stage function timed from inside (its own work) and every task call timed from the flow
body (the work plus Prefect's task machinery: state changes, cache key, result persistence). The embedded
server starts first, with a trivial flow, and is reported apart. Prints the overhead as a fraction last.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from common import machine, verdict

TARGET_FRACTION = 0.10
TARGET_PER_TASK_S = 1.0


def timed_tasks(module) -> dict[str, dict[str, float]]:
    """Wrap every task of the flow module: its function's own time, and the time of each call of the task."""
    from prefect import Task

    times: dict[str, dict[str, float]] = {}
    for attribute, task in list(vars(module).items()):
        if not isinstance(task, Task):
            continue
        entry = times.setdefault(task.name, {"work_s": 0.0, "call_s": 0.0, "calls": 0})
        task.fn = _timed(task.fn, entry, "work_s")
        setattr(module, attribute, _timed_call(task, entry))
    return times


def _timed(fn, entry: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry[key] += time.perf_counter() - started
    return wrapper


def _timed_call(task, entry: dict):
    def call(*args, **kwargs):
        entry["calls"] += 1
        return _timed(task, entry, "call_s")(*args, **kwargs)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-overhead-") as tmp:
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")  # before Prefect is imported: a fresh database
        from flows.cli import _route_stage_logs

        _route_stage_logs()  # as `ftpipe run` does: stage logs go to Prefect (a cost counted here), no telemetry
        print(machine())
        from prefect import flow

        import flows.finetune as module
        from recipes.loader import resolve_recipe

        @flow(name="warm-up")
        def warm_up() -> None:
            """Starts the embedded server, as the first flow of `ftpipe run` does."""

        started = time.perf_counter()
        warm_up()
        server_s = time.perf_counter() - started
        times = timed_tasks(module)
        recipe = resolve_recipe("quickstart", args.overrides or None)
        started = time.perf_counter()
        module.finetune(recipe, output_dir=str(Path(tmp) / "runs"))
        flow_s = time.perf_counter() - started
        logging.getLogger("prefect").setLevel(logging.WARNING)  # the server's stop line would come after the ratio
    report(times, flow_s, server_s)


def report(times: dict[str, dict[str, float]], flow_s: float, server_s: float) -> None:
    ran = {name: t for name, t in times.items() if t["calls"]}
    print(f"\n{'stage':<18} {'own work s':>10} {'task call s':>11} {'Prefect s':>9}")
    for name, t in ran.items():
        print(f"{name:<18} {t['work_s']:>10.2f} {t['call_s']:>11.2f} {t['call_s'] - t['work_s']:>9.2f}")
    work = sum(t["work_s"] for t in ran.values())
    per_task = max(t["call_s"] - t["work_s"] for t in ran.values())
    overhead = flow_s - work
    print(f"\nembedded server start (first flow of a process): {server_s:.1f} s, apart from the run below")
    print(f"flow wall time {flow_s:.1f} s; stages' own work {work:.1f} s; orchestration (flow minus stages) {overhead:.2f} s")
    print(f"largest per-task Prefect overhead: {per_task:.2f} s ({verdict(per_task, TARGET_PER_TASK_S, at_least=False)})")
    print(json.dumps({"flow_s": round(flow_s, 2), "work_s": round(work, 2), "server_s": round(server_s, 2)}))
    print(f"counting the embedded server's start as orchestration too: {(overhead + server_s) / (flow_s + server_s):.3f} "
          "of the run (a Prefect server that is already up, as in production, has none)")
    fraction = overhead / flow_s
    print(f"orchestration overhead / flow wall time = {fraction:.3f} ({verdict(fraction, TARGET_FRACTION, at_least=False)})")


if __name__ == "__main__":
    main()
