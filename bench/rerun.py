"""A second `ftpipe run` of an unchanged recipe against the first, side by side in one script: the second should
take <= 15% of the first, its stages ending Cached. Prints both wall times and the ratio last.

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

TARGET = 0.15


def timed_run(recipe: str, overrides: list[str], out: Path, env: dict) -> tuple[float, str]:
    command = [sys.executable, "-m", "flows.cli", "run", recipe, *[f"--set={o}" for o in overrides], "--output-dir", str(out)]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"ftpipe run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftpipe-rerun-") as folder:
        root = Path(folder)
        (root / "prefect").mkdir()
        # a fresh Prefect home (database, result storage) and model cache: the first run starts cold
        env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), FTPIPE_CACHE=str(root / "cache"))
        first, _ = timed_run(args.recipe, args.overrides, root / "runs", env)
        second, log = timed_run(args.recipe, args.overrides, root / "runs", env)
    cached = sorted(set(re.findall(r"Task run '([a-z-]+)-\w+' - Finished in state Cached", log)))
    ran = sorted(set(re.findall(r"Task run '([a-z-]+)-\w+' - Finished in state Completed", log)))
    print(f"first run:  {first:.1f} s")
    print(f"second run: {second:.1f} s; cached: {', '.join(cached)}; ran: {', '.join(ran)}")
    ratio = second / first
    print(f"second / first = {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
