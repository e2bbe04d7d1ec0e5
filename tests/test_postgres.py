"""Production server state: the finetune flow against a Prefect server backed by a real PostgreSQL that the test
starts on 127.0.0.1 (skipped where PostgreSQL is not installed; `.ci/run` installs it)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHORT_RUN_ARGS, free_port, prefect_server_process



def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return Path(found).resolve().parent if found else None  # Debian links initdb into /usr/local/bin, not createdb


@pytest.fixture
def postgres():
    """A throwaway cluster on 127.0.0.1 (as the `postgres` user when the tests run as root: initdb refuses root)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found); .ci/run installs Debian's postgresql")
    user = "postgres" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="ftpipe-pg-"))  # not under pytest's folder, which only root may enter
    home.chmod(0o755)
    data = home / "data"
    data.mkdir()
    if user:
        os.chown(data, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    port = free_port()

    def pg(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(bin_dir / command[0]), *command[1:]], user=user, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    pg("initdb", "-D", str(data), "-A", "trust", "-U", "prefect")
    pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "start",
       "-o", f"-p {port} -h 127.0.0.1 -k {data}")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", lambda sql: pg(
            "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect", "-tAc", sql).stdout.strip()
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(home, ignore_errors=True)


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
