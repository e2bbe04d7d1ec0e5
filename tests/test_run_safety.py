"""Reruns and crashes against a real Prefect server the tests start on 127.0.0.1: two runs of one recipe into one
folder at once, a run killed with SIGKILL mid-training (Crashed, its gpu slot freed, its leftovers removed by the next
run, which resumes), and a rerun over a corrupted artifact (exported again, the same version, never registered
corrupt)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runlock import LOCK_NAME, remove_leftovers, run_folder_lock
from serving.registry import Registry
from tests.conftest import ROOT, SHORT_RUN_ARGS, api, api_response, prefect_server_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server_process(tmp_path_factory.mktemp("prefect-safety")) as (url, env):
        yield url, env


def ftpipe_run(env: dict, out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "quickstart", *SHORT_RUN_ARGS, *overrides, "--output-dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_runs_of_one_recipe_into_one_folder_take_turns_and_register_one_version(server, tmp_path):
    url, env = server
    runs = [ftpipe_run(env, tmp_path), ftpipe_run(env, tmp_path)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]  # the same artifact
    assert sum("is in use by" in o[1] for o in outputs) == 1  # the later one waited for the first, then reused its stages
    registry = Registry(tmp_path / "registry")
    assert [v.version for v in registry.versions("quickstart")] == ["1"] and registry.verify("quickstart") == []


def gpu_slots(url: str) -> int:
    return api("GET", f"{url}/v2/concurrency_limits/gpu")["active_slots"]


def test_a_killed_run_ends_crashed_frees_its_gpu_slot_and_the_next_run_resumes_and_cleans_up(server, tmp_path):
    url, env = server
    response = api_response("POST", f"{url}/v2/concurrency_limits/", json={"name": "gpu", "limit": 1})
    assert response.is_success or response.status_code == 409, response.text
    run = ftpipe_run(env, tmp_path, "--set", "training.max_steps=60", "--set", "training.save_steps=10")
    deadline = time.monotonic() + 600
    checkpoints = tmp_path.glob("quickstart-*/training/checkpoints/checkpoint-*")
    while not any(p.name.endswith(("-10", "-20")) for p in checkpoints) or gpu_slots(url) != 1:
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(2)
        checkpoints = tmp_path.glob("quickstart-*/training/checkpoints/checkpoint-*")
    flow_run = api("POST", f"{url}/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})[0]
    os.killpg(run.pid, signal.SIGKILL)  # the command and its training worker, no cleanup: an OOM kill or a lost node
    run.wait()

    deadline = time.monotonic() + 300  # 90 s without a heartbeat, then the automation; 60 s lease + 15 s repossessor
    while api("GET", f"{url}/flow_runs/{flow_run['id']}")["state"]["type"] != "CRASHED" or gpu_slots(url) != 0:
        assert time.monotonic() < deadline, (api("GET", f"{url}/flow_runs/{flow_run['id']}")["state"], gpu_slots(url))
        time.sleep(5)

    run_dir = next(tmp_path.glob("quickstart-*"))
    leftovers = [run_dir / ".artifact.staging-4242" / "model", run_dir / "data" / ".signatures-1.bin"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a killed run")
    again = ftpipe_run(env, tmp_path, "--set", "training.max_steps=60", "--set", "training.save_steps=10")
    stdout, stderr = again.communicate(timeout=900)
    assert again.returncode == 0, stderr[-3000:]
    assert "resumed from checkpoint at step" in stderr
    assert not any(p.exists() for p in leftovers) and not (run_dir / ".artifact.staging-4242").exists()
    result = json.loads((run_dir / "training" / "result.json").read_text())
    assert result["resumed_at_step"] >= 10 and result["resumed_from"].startswith("checkpoint-")
    assert not (run_dir / "training" / "checkpoints" / result["resumed_from"]).exists()  # rotated away since
    third = ftpipe_run(env, tmp_path, "--set", "training.max_steps=60", "--set", "training.save_steps=10")
    stdout, stderr = third.communicate(timeout=900)
    assert third.returncode == 0 and "Finished in state Cached" in stderr.split("Task run 'train", 1)[1].splitlines()[0], \
        [line for line in stderr.splitlines() if "Task run" in line or "stale" in line or "resumed" in line]
    assert [v.version for v in Registry(tmp_path / "registry").versions("quickstart")] == ["1"]


def test_a_rerun_over_a_corrupted_artifact_exports_again_and_keeps_the_same_version(server, tmp_path):
    url, env = server
    first = ftpipe_run(env, tmp_path)
    stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-3000:]
    artifact = Path(stdout.splitlines()[-1].removeprefix("artifact: "))
    shard = next((artifact / "model").glob("*.safetensors"))
    shard.write_bytes(bytes(shard.stat().st_size))  # zeroed in the run folder
    second = ftpipe_run(env, tmp_path)
    stdout, stderr = second.communicate(timeout=900)
    assert second.returncode == 0, stderr[-3000:]
    assert "Task run 'export" in stderr and "Finished in state Completed()" in stderr.split("Task run 'export", 1)[1].splitlines()[0]
    registry = Registry(tmp_path / "registry")
    assert [v.version for v in registry.versions("quickstart")] == ["1"]  # the same bytes again: no duplicate version
    assert registry.verify("quickstart") == [] and registry.aliases("quickstart")["production"] == "1"
    assert subprocess.run([sys.executable, "-m", "flows.cli", "check-artifact", str(artifact)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300).returncode == 0
    forced = ftpipe_run(env, tmp_path, "--force")  # every stage again, training too: the same bytes, the same version
    stdout, stderr = forced.communicate(timeout=900)
    assert forced.returncode == 0, stderr[-3000:]
    assert [v.version for v in registry.versions("quickstart")] == ["1"]


def _hold_lock(folder: str, seconds: float) -> None:
    with run_folder_lock(Path(folder), "first run"):
        time.sleep(seconds)


def test_the_run_folder_lock_makes_a_second_holder_wait_and_removes_only_leftovers(tmp_path):
    import multiprocessing

    keep = [tmp_path / "data" / "train.jsonl", tmp_path / "artifact" / "manifest.json", tmp_path / "training" / "checkpoints" / "x.bin"]
    gone = [tmp_path / ".artifact.staging-77" / "model" / "a.safetensors", tmp_path / ".artifact.old-77" / "b",
            tmp_path / "data" / "for-model-1" / ".signatures-9.bin"]
    keep.append(tmp_path / "data" / "for-model-2" / ".train.jsonl.abc.tmp")  # another run may be writing it (see LEFTOVERS)
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    holder = multiprocessing.get_context("spawn").Process(target=_hold_lock, args=(str(tmp_path), 4))
    holder.start()
    while not (tmp_path / LOCK_NAME).exists() or "first run" not in (tmp_path / LOCK_NAME).read_text():
        time.sleep(0.1)
    started = time.monotonic()
    with run_folder_lock(tmp_path, "second run"):
        waited = time.monotonic() - started
        assert "second run" in (tmp_path / LOCK_NAME).read_text()
    holder.join()
    assert waited > 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert remove_leftovers(tmp_path) == []
