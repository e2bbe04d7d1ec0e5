"""Shared fixtures: tiny models built once per session (never downloaded), sample rows, run helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from bench.common import (api_response, background, deployment_id, free_port, prefect_server_process, stop,  # noqa: F401
                          wait_until_healthy)  # shared with the benchmarks

ROOT = Path(__file__).resolve().parent.parent


def _tool_python(variable: str, folder: str) -> str | None:
    """A tool environment's Python for the tests: $variable, else the README's environment in the repository
    (`ftpipe vllm-env .vllm`, `ftpipe quantize-env .quantize`). The variable is taken out of the tests' environment:
    a test asks for the tool explicitly."""
    given = os.environ.pop(variable, None) or (str(ROOT / folder / "bin" / "python") if (ROOT / folder / "bin" / "python").exists() else None)
    return str(Path(given).absolute()) if given else None


# vLLM's own code runs on artifacts, and llm-compressor quantizes exports, where their environments are given; CI sets
# FTPIPE_REQUIRE_TOOL_ENVS, so there a missing environment fails those tests instead of skipping them.
VLLM_PYTHON = _tool_python("FTPIPE_VLLM_PYTHON", ".vllm")
QUANTIZE_PYTHON = _tool_python("FTPIPE_QUANTIZE_PYTHON", ".quantize")


def vllm_required() -> None:
    """Skip a test that needs vLLM's own code when no vLLM environment is given (fail where CI requires one)."""
    _tool_required(VLLM_PYTHON, "vLLM", "ftpipe vllm-env .vllm", "FTPIPE_VLLM_PYTHON=.vllm/bin/python")


def quantize_required() -> None:
    """Skip a test that quantizes when no llm-compressor environment is given (fail where CI requires one)."""
    _tool_required(QUANTIZE_PYTHON, "llm-compressor", "ftpipe quantize-env .quantize", "FTPIPE_QUANTIZE_PYTHON=.quantize/bin/python")


def _tool_required(python: str | None, tool: str, make: str, variable: str) -> None:
    if not python:
        message = f"no {tool} environment: make one with `{make}` and set {variable}"
        if os.environ.get("FTPIPE_REQUIRE_TOOL_ENVS"):
            pytest.fail(message)
        pytest.skip(message)


def serve_with_vllm_and_smoke(artifact_dir: str | Path, script: str, suite: str | Path, min_exact_match: float = 0.8) -> None:
    """Start one of the artifact's launch scripts with the vLLM environment on the GPU (`ftpipe vllm-env .vllm --full`)
    and require `ftpipe smoke` to get the task right through its chat endpoint."""
    vllm_required()
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(VLLM_PYTHON).parent}:{os.environ['PATH']}", "VLLM_TARGET_DEVICE": "cuda"}
    server = subprocess.Popen(["bash", str(Path(artifact_dir) / script), "--host", "127.0.0.1", "--port", str(port),
                               "--gpu-memory-utilization", "0.3"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", server, 600, "vllm serve")
        result = run_ftpipe("smoke", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "quickstart", "--suite", str(suite),
                            "--limit", "16", "--max-tokens", "32", "--min-exact-match", str(min_exact_match))
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=60)


def vllm_refusals(artifact_dir: str | Path) -> list[str]:
    """What vLLM's own code refuses in an artifact ([] where no vLLM environment is given: see vllm_required)."""
    if not VLLM_PYTHON:
        return []
    from serving.vllm_env import check_with_vllm

    return [f"{v['check']}: {v['detail']}" for v in check_with_vllm(Path(artifact_dir), VLLM_PYTHON) if not v["ok"]]
SAMPLE_TRAIN = ROOT / "recipes" / "data" / "support_tickets_train.jsonl"
SAMPLE_HELDOUT = ROOT / "recipes" / "data" / "support_tickets_heldout.jsonl"
PREFERENCE_TRAIN = ROOT / "recipes" / "data" / "support_tickets_preferences_train.jsonl"
PREFERENCE_HELDOUT = ROOT / "recipes" / "data" / "support_tickets_preferences_heldout.jsonl"

# Tiny models and Prefect's database go to a per-session folder, never the user's home, and no test
# may reach a hub. Set before any test imports transformers, and inherited by every child process.
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A quickstart short enough for server and browser tests: few steps, few eval rows, no gates.
SHORT_RUN = {"training.max_steps": 3, "evaluation.max_samples": 8, "evaluation.generation.max_new_tokens": 8,
             "evaluation.gates": [], "evaluation.safety.max_new_tokens": 4}
SHORT_RUN_ARGS = [arg for path, value in SHORT_RUN.items() for arg in ("--set", f"{path}={json.dumps(value)}")]
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ftpipe-tests-"))
os.environ.setdefault("FTPIPE_CACHE", str(_SESSION_DIR / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def read_rows(path: Path, n: int | None = None) -> list[dict]:
    with path.open() as f:
        rows = [json.loads(line) for line in f]
    return rows[:n]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    return read_rows(SAMPLE_TRAIN)


@pytest.fixture(scope="session")
def corpus(sample_rows) -> list[str]:
    return [m["content"] for row in sample_rows for m in row["messages"]]


@pytest.fixture(scope="session")
def tiny_refs(corpus):
    """One tiny model per family (2 layers, fixed seed), built from the sample corpus."""
    from recipes.schema import TINY_FAMILIES, ModelSection
    from training.models import resolve_base

    return {family: resolve_base(ModelSection(base=f"tiny:{family}"), lambda: corpus) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tokenizers(tiny_refs):
    from recipes.schema import ModelSection
    from training.models import load_tokenizer

    return {family: load_tokenizer(ref, ModelSection(base=f"tiny:{family}")) for family, ref in tiny_refs.items()}


@pytest.fixture(scope="session")
def prepared_small(tmp_path_factory):
    """Prepared data: 400 training rows and 40 held-out rows of the sample task."""
    from data_prep.prepare import prepare_data
    from recipes.schema import DataSection, DataSource

    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(folder / "train.jsonl", read_rows(SAMPLE_TRAIN, 400))
    held = write_jsonl(folder / "held.jsonl", read_rows(SAMPLE_HELDOUT, 40))
    section = DataSection(sources=[DataSource(path=str(train))], eval_sources=[DataSource(path=str(held))])
    return prepare_data(section, folder / "prepared")


@pytest.fixture(scope="session")
def prepared_preferences(tmp_path_factory):
    """Prepared preference data: 200 training rows and 20 held-out rows of the sample task."""
    from data_prep.prepare import prepare_data
    from recipes.schema import DataSection, DataSource

    folder = tmp_path_factory.mktemp("preferences")
    train = write_jsonl(folder / "train.jsonl", read_rows(PREFERENCE_TRAIN, 200))
    held = write_jsonl(folder / "held.jsonl", read_rows(PREFERENCE_HELDOUT, 20))
    section = DataSection(sources=[DataSource(path=str(train), format="preference")],
                          eval_sources=[DataSource(path=str(held), format="preference")])
    return prepare_data(section, folder / "prepared")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect server for the session (Prefect's harness must not be nested)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def api(method: str, url: str, **kwargs):
    """The JSON of a successful Prefect REST call; any other answer fails the test with its status and body."""
    response = api_response(method, url, **kwargs)
    assert response.is_success, f"{method} {url} -> {response.status_code}: {response.text[:2000]}"
    return response.json()


def create_run(url: str, deployment: str, parameters: dict) -> str:
    """A flow run of a deployment over REST; the idempotency key makes a retried POST return the same run."""
    body = {"parameters": parameters, "idempotency_key": str(uuid.uuid4())}
    return api("POST", f"{url}/deployments/{deployment}/create_flow_run", json=body)["id"]


def wait_for(url: str, run_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = api("GET", f"{url}/flow_runs/{run_id}")
        if flow_run["state"]["type"] in TERMINAL:
            return flow_run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:g} s")


def run_ftpipe(*args: str, cwd: Path | None = None, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run the installed command line as a user would (`env`: variables set for it)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **env))


def write_ticket_task(folder: Path, rows: int = 6) -> str:
    """An lm-evaluation-harness task over held-out sample rows, from local JSONL (no hub); returns its name."""
    questions = [{"question": r["messages"][1]["content"], "answer": r["messages"][2]["content"]} for r in read_rows(SAMPLE_HELDOUT, rows)]
    write_jsonl(folder / "tickets.jsonl", questions)
    (folder / "tickets.yaml").write_text(f"""task: ftpipe_tickets
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tickets.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{max_gen_toks: 16, do_sample: false, until: []}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    return "ftpipe_tickets"


LINEAGE = {"name": "test", "recipe_hash": "0" * 64, "recipe": {"training": {"method": "sft", "adapter": "lora"}},
           "data": {"fingerprint": "f" * 64}, "gates": {"passed": True, "results": []}, "max_seq_length": 256,
           "evaluation": {"examples": {"heldout": 1}, "base": {"exact_match": 0.0}, "candidate": {"exact_match": 1.0}}}


@pytest.fixture(scope="session")
def trained_lora(prepared_small, tmp_path_factory):
    """A tiny llama LoRA that has learned the ticket task well enough to be compared and exported (hf backend)."""
    from recipes.schema import ModelSection, TrackingSection, TrainingSection
    from training.train import train

    section = TrainingSection(max_steps=60, batch_size=16, learning_rate=3e-3, max_seq_length=256, backend="hf")
    return train(section, ModelSection(), TrackingSection(), prepared_small, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="session")
def artifact(trained_lora, prepared_small, tmp_path_factory):
    """trained_lora exported as the vLLM-ready artifact (tests copy it before breaking it)."""
    from recipes.schema import ExportSection, ModelSection
    from serving.export import export_artifact

    return export_artifact(ExportSection(), ModelSection(), trained_lora, prepared_small.eval_path, LINEAGE, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def served_artifact(artifact, tmp_path_factory):
    """`transformers serve` (OpenAI-compatible) on loopback, serving the merged model on CPU, started as
    evaluation.serve starts it; stopped after the session (shared by the smoke and the endpoint evaluation tests)."""
    from evaluation.served import local_server

    model = str(Path(artifact.path) / "model")
    with local_server("transformers", Path(model), tmp_path_factory.mktemp("served") / "server.log") as (url, _):
        yield url, model
