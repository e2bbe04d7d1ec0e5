"""The REST call the README gives platform teams (`create_flow_run` on the finetune deployment), made as fast as one
client can for a fixed time while `ftpipe serve` polls the same server, against Prefect's SQLite and against
PostgreSQL side by side: how many answers are 503 `Service Unavailable` (two SQLite writes colliding), and whether
the README's remedy holds: retrying a 503 with the same idempotency key ends with exactly one flow run per key.
Runs are created Scheduled for 2030, so none of them trains.

    python bench/rest_contention.py [--seconds 60]

Prints one line per database and, last, the 503 fraction on SQLite over that on PostgreSQL (PostgreSQL at 0 gives
"inf"; 0/0 gives 1.0). Needs PostgreSQL's initdb (Debian's postgresql) for the PostgreSQL side.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from common import background, deployment_id, postgres_bin, postgres_cluster, prefect_server_process, stop

FAR_FUTURE = {"type": "SCHEDULED", "state_details": {"scheduled_time": "2030-01-01T00:00:00Z"}}


def post_until_created(url: str, deployment: str, key: str, codes: collections.Counter) -> None:
    """The README's call with curl's `--retry 5`: a 503 is sent again with the same idempotency key, after curl's
    waits (1, 2, 4 ... s). Its own loop rather than `api_response`, because every attempt's answer is counted."""
    body = {"parameters": {"recipe": "quickstart"}, "state": FAR_FUTURE, "idempotency_key": key}
    for attempt in range(6):
        response = httpx.post(f"{url}/deployments/{deployment}/create_flow_run", json=body, timeout=120)
        codes[response.status_code] += 1
        if response.status_code != 503:
            break
        time.sleep(min(2 ** attempt, 10))
    codes["created" if response.status_code == 201 else f"gave up {response.status_code}"] += 1


def hammer(database: str, seconds: float, database_url: str | None) -> dict:
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        server_env = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}
        url, env = stack.enter_context(prefect_server_process(Path(folder) / "prefect", **server_env))
        log = Path(folder) / "serve.log"
        serve = background([sys.executable, "-m", "flows.cli", "serve", "--output-dir", folder, "--gpus", "1"], env, log)
        stack.callback(stop, serve)
        deployment = deployment_id(url, "finetune/finetune", serve, log, timeout=180)
        codes: collections.Counter = collections.Counter()
        keys = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            post_until_created(url, deployment, f"bench-{uuid.uuid4()}", codes)
            keys += 1
        runs = httpx.post(f"{url}/flow_runs/count", json={"deployments": {"id": {"any_": [deployment]}}}).json()
    calls = sum(count for code, count in codes.items() if isinstance(code, int))
    return {"database": database, "keys": keys, "calls": calls, "503": codes[503], "created": codes["created"],
            "flow runs": runs, "fraction_503": codes[503] / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    bin_dir = postgres_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL is not installed (initdb not found): apt-get install postgresql")
    sqlite = hammer("sqlite", args.seconds, None)
    print(sqlite, flush=True)
    with postgres_cluster(bin_dir) as (database_url, _):
        postgres = hammer("postgresql", args.seconds, database_url)
    print(postgres, flush=True)
    for result in (sqlite, postgres):
        if result["flow runs"] != result["keys"]:
            sys.exit(f"{result['database']}: {result['flow runs']} flow runs for {result['keys']} idempotency keys")
    if postgres["fraction_503"]:
        ratio = sqlite["fraction_503"] / postgres["fraction_503"]
    else:
        ratio = float("inf") if sqlite["fraction_503"] else 1.0
    print(f"every key made exactly one flow run on both; 503 fraction sqlite/postgresql = {ratio}")


if __name__ == "__main__":
    main()
