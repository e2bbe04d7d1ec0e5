"""Serving parity: the merged candidate scored as it will be served, behind a local OpenAI-compatible server.

In-process evaluation renders prompts with our code and generates in float32 on CPU; production renders with the
server's chat renderer from the shipped template and generates in the export dtype. evaluation.serve merges the
adapter exactly as export will, starts `transformers serve` (CPU) or vLLM (a GPU and `ftpipe vllm-env`) on it,
scores every suite through the endpoint client, and records how often the served answers equal the in-process
candidate's and each metric's delta with its paired interval: the model as served must score as trained.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from data_prep.files import atomic_write_json
from evaluation.confidence import interval
from evaluation.endpoints import EndpointClient
from evaluation.evaluate import EvalResult, _suites, judging, score_suite
from recipes.schema import SERVED, EndpointSection, EvaluationSection, ExportSection, ModelSection

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = {"transformers": 300, "vllm": 900}


class ServeError(RuntimeError):
    """The local server could not be started (or the environment it needs is missing)."""


def score_served(section: EvaluationSection, export: ExportSection, model_section: ModelSection, trained, data,
                 evaluation: EvalResult, out_dir: str | Path) -> EvalResult:
    """Merge, serve, score every suite through the server, and compare with the in-process candidate."""
    from serving.export import merge_adapter

    out_dir = Path(out_dir)
    merged_dir = out_dir / "merged"
    merge_adapter(export, model_section, trained, merged_dir)
    suites = _suites(section, data)
    with local_server(section.serve, merged_dir, out_dir / "server.log") as (base_url, server):
        endpoint = EndpointSection(name=SERVED, base_url=base_url, model=str(merged_dir), concurrency=4, max_retries=2,
                                   timeout_s=600, extra_body={"chat_template_kwargs": model_section.chat_template_kwargs}
                                   if model_section.chat_template_kwargs else {})
        with EndpointClient(endpoint, section.generation.max_new_tokens) as client, judging(section) as judge:
            served = [score_suite(client, None, suite, rows, section, None, judge) for suite, rows in suites]
            usage = client.usage.to_dict()
    shutil.rmtree(merged_dir, ignore_errors=True)
    record = parity(section, suites, served, evaluation) | {"server": server, "usage": usage}
    atomic_write_json(out_dir / "report.json", record | {"outputs": {suite.name: scores.outputs for (suite, _), scores
                                                                     in zip(suites, served, strict=True)}})
    log.info("served (%s): %s", server, record["parity_line"])
    return replace(evaluation, served=record)


def parity(section: EvaluationSection, suites, served: list, evaluation: EvalResult) -> dict:
    """served.<metric> for the gates, the share of answers identical to the in-process candidate's
    (served.answer_agreement), and each metric's served-minus-candidate delta with its paired interval."""
    candidate = evaluation.scores["candidate"]
    metrics, deltas, same, answered = {}, {}, 0, 0
    for i, ((suite, _), scores) in enumerate(zip(suites, served, strict=True)):
        mine = candidate.suites[i]
        for metric, value in scores.metrics.items():
            key = f"{SERVED}.{suite.metric_key(metric)}"
            metrics[key] = value
            theirs, ours = scores.statistic(metric), mine.statistic(metric)
            if theirs is not None and ours is not None:
                deltas[key] = interval(theirs, ours, section.confidence, section.bootstrap_samples, section.bootstrap_seed)
        if scores.outputs and mine.outputs:
            same += sum(a == b for a, b in zip(scores.outputs, mine.outputs, strict=True))
            answered += len(scores.outputs)
    if answered:
        metrics[f"{SERVED}.answer_agreement"] = same / answered
    agreement = metrics.get(f"{SERVED}.answer_agreement")
    line = (f"{same} of {answered} answers identical to the in-process candidate's ({agreement:.1%})" if answered
            else "no generated answers to compare")
    worst = max(deltas.items(), key=lambda kv: abs(kv[1]["value"]) if kv[1] else 0.0, default=None)
    if worst and worst[1]:
        line += f"; largest metric change {worst[0]} {worst[1]['value']:+.4f} [{worst[1]['low']:+.4f}, {worst[1]['high']:+.4f}]"
    return {"metrics": metrics, "deltas": deltas, "identical_answers": same, "answers": answered, "parity_line": line}


@contextmanager
def local_server(kind: str, model_dir: Path, log_path: Path, options: tuple[str, ...] = ()):
    """(base_url, description) of an OpenAI-compatible server on loopback serving model_dir (more command-line
    options of the server in `options`); stopped on exit."""
    from training.launch import free_port, stop_process_group

    port = free_port()
    command, description = _server_command(kind, model_dir, port)
    command, description = [*command, *options], " ".join([description, *options])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=os.environ | {"HF_HUB_OFFLINE": "1"})
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}/health", process, STARTUP_TIMEOUT_S[kind], description,
                               lambda: f"its log ({log_path}) ends:\n" + log_path.read_text()[-2000:])
            yield f"http://127.0.0.1:{port}/v1", description
        finally:
            stop_process_group(process)


def _server_command(kind: str, model_dir: Path, port: int) -> tuple[list[str], str]:
    import torch

    address = ["--host", "127.0.0.1", "--port", str(port)]
    if kind == "transformers":
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return ([sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), *address, "--device", device],
                f"transformers serve {transformers.__version__} on {device}")
    from serving.vllm_env import VLLM_VERSION, vllm_python

    python = vllm_python()
    if python is None or not torch.cuda.is_available():
        raise ServeError("evaluation.serve: vllm needs a CUDA GPU and vLLM's environment (`ftpipe vllm-env .vllm --full`, then "
                         "FTPIPE_VLLM_PYTHON=.vllm/bin/python); on CPU use evaluation.serve: transformers")
    return ([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *address],
            f"vLLM {VLLM_VERSION} on {torch.cuda.get_device_name(0)}")


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float, what: str, output: Callable[[], str] = str) -> None:
    """Poll a server's health URL until it answers 200; ServeError with the server's output (`output()`) when it exits
    first, or when timeout_s pass."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise ServeError(f"{what} exited with code {process.returncode} before it was ready: {output()}")
        if time.monotonic() > deadline:
            raise ServeError(f"{what} was not ready within {timeout_s:g} s")
        time.sleep(0.5)
