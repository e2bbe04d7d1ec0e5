"""A second `ftpipe run` of an unchanged recipe against the first, side by side in one script: the second should
take <= 15% of the first, its stages ending Cached. Measured twice: with Prefect's embedded server (each command
starts its own, ~10 s, and both runs pay it) and against a Prefect server that is already up (as under `ftpipe
serve`, a worker or the UI). Prints both pairs and, last, the ratio against the running server.

    python bench/rerun.py [--recipe quickstart] [--set path=value ...]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import prefect_server_process, verdict

TARGET = 0.15


def timed_run(recipe: str, overrides: list[str], out: Path, env: dict) -> tuple[float, str]:
    command = [sys.executable, "-m", "flows.cli", "run", recipe, *[f"--set={o}" for o in overrides], "--output-dir", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"ftpipe run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def first_and_second(recipe: str, overrides: list[str], root: Path, env: dict) -> tuple[float, float, str]:
    first, _ = timed_run(recipe, overrides, root / "runs", env)
    second, log = timed_run(recipe, overrides, root / "runs", env)
    cached = sorted(set(re.findall(r"Task run '([a-z-]+)-\w+' - Finished in state Cached", log)))
    ran = sorted(set(re.findall(r"Task run '([a-z-]+)-\w+' - Finished in state Completed", log)))
    return first, second, f"cached: {', '.join(cached)}; ran: {', '.join(ran)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    pairs = {}
    for mode in ("embedded server", "running server"):
        with tempfile.TemporaryDirectory(prefix="ftpipe-rerun-") as folder:
            root = Path(folder)
            (root / "prefect").mkdir()
            # a fresh Prefect home (database, result storage) and model cache: the first run starts cold
            env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), FTPIPE_CACHE=str(root / "cache"))
            if mode == "embedded server":
                pairs[mode] = first_and_second(args.recipe, args.overrides, root, env)
                continue
            with prefect_server_process(root / "prefect") as (url, server_env):
                pairs[mode] = first_and_second(args.recipe, args.overrides, root, {**env, **server_env, "FTPIPE_CACHE": env["FTPIPE_CACHE"]})
    for mode, (first, second, stages) in pairs.items():
        print(f"{mode}: first run {first:.1f} s, second {second:.1f} s, second / first = {second / first:.3f}; {stages}")
    first, second, _ = pairs["running server"]
    print(f"second / first against a running Prefect server = {second / first:.3f} ({verdict(second / first, TARGET, at_least=False)})")

if __name__ == "__main__":
    main()
