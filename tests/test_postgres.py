"""Production server state: the finetune flow against a Prefect server backed by a real PostgreSQL that the test
starts on 127.0.0.1 (skipped where PostgreSQL is not installed; `.ci/run` installs it)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bench.common import postgres_bin, postgres_cluster
from tests.conftest import ROOT, SHORT_RUN_ARGS, prefect_server_process


@pytest.fixture
def postgres():
    """A throwaway cluster on 127.0.0.1: (the asyncpg URL, a function running one SQL query)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found); .ci/run installs Debian's postgresql")
    with postgres_cluster(bin_dir) as (database_url, query):
        yield database_url, query


@pytest.mark.slow
def test_the_flow_runs_against_a_prefect_server_backed_by_postgresql(postgres, tmp_path):
    database_url, query = postgres
    with prefect_server_process(tmp_path / "prefect", PREFECT_API_DATABASE_CONNECTION_URL=database_url) as (url, env):
        run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "quickstart", *SHORT_RUN_ARGS, "--output-dir", str(tmp_path / "runs")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
    assert query("select state_type from flow_run where name is not null and flow_id in "
                 "(select id from flow where name = 'finetune')") == "COMPLETED"
    stages = set(query("select distinct split_part(name, '-', 1) from task_run where state_type = 'COMPLETED'").split())
    assert {"prepare", "train", "evaluate", "gate", "export", "register"} <= stages
