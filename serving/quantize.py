"""Quantized exports for vLLM: the merged model in compressed-tensors format, written by llm-compressor and scored
against the 16-bit candidate on the held-out rows before the gates (export.quantize).

llm-compressor runs in an environment of its own (`ftpipe quantize-env`): 0.14 pins torch<=2.14.0 and
compressed-tensors 0.19, which fit neither ftpipe's pins (torch 2.14.1) nor vLLM 0.33's (compressed-tensors 0.17).
ftpipe itself reads the result with compressed-tensors (the same 0.19) through transformers, to score it.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from data_prep.files import atomic_write_json
from evaluation.evaluate import EvalResult, judging, score_suite, suite_rows
from recipes.schema import HELD_OUT_SUITE, QUANTIZED, EvaluationSection, ExportSection, ModelSection
from serving.export import merge_adapter
from serving.vllm_env import ToolEnvError, make_venv, run_pip, run_tool_script, tool_python

log = logging.getLogger(__name__)

SCHEMES = {"fp8_dynamic": "FP8_DYNAMIC", "w4a16": "W4A16"}  # export.quantize -> llm-compressor's preset scheme
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
# The newest torch llm-compressor 0.14 allows whose CPU build pip takes without a several-GB CUDA download; both
# schemes are data-free, so quantizing needs no GPU (--torch picks another build).
QUANTIZE_TORCH = "2.13.0"
QUANTIZE_PYTHON_ENV = "FTPIPE_QUANTIZE_PYTHON"
SCRIPT = Path(__file__).with_name("quantize_script.py")


class QuantizeError(RuntimeError):
    """The quantized export could not be made; the message says what to do."""


def quantize_python() -> str | None:
    """The quantize environment's Python: $FTPIPE_QUANTIZE_PYTHON, else none."""
    return tool_python(None, QUANTIZE_PYTHON_ENV)


def quantize_env_problems(scheme: str) -> list[str]:
    """Why export.quantize cannot run on this machine (for validate and the flow's start)."""
    if scheme == "none":
        return []
    python = quantize_python()
    if not python:
        return [f"export.quantize: {scheme} needs llm-compressor's environment: make it with `ftpipe quantize-env .quantize` "
                f"and set {QUANTIZE_PYTHON_ENV}=.quantize/bin/python"]
    if not Path(python).is_file() and not shutil.which(python):
        return [f"export.quantize: {QUANTIZE_PYTHON_ENV}={python}: no such program; make it with `ftpipe quantize-env PATH`"]
    return []


def create_quantize_env(target: Path, torch_spec: str | None = None, pip_args: tuple[str, ...] = ()) -> Path:
    """A virtual environment at target with llm-compressor and a torch it allows; returns its Python."""
    python = make_venv(target)
    torch_spec = torch_spec or QUANTIZE_TORCH
    run_pip(python, "install", LLMCOMPRESSOR, f"torch{torch_spec if torch_spec[0] in '=<>~!' else '==' + torch_spec}", *pip_args)
    imported = subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True, text=True)
    if imported.returncode != 0:
        raise ToolEnvError(f"{target}: llmcompressor does not import: {imported.stderr.strip().splitlines()[-1:]}")
    return python


def quantize_model(model_dir: Path, out_dir: Path, scheme: str, python: str, timeout_s: int = 7200) -> dict:
    """Write out_dir: model_dir's weights quantized with `scheme` (export.quantize) in compressed-tensors format, and
    every other file of model_dir (tokenizer, chat template, render settings, generation config) copied unchanged."""
    from serving.export import ensure_index

    shutil.rmtree(out_dir, ignore_errors=True)
    request = {"model": str(model_dir), "out": str(out_dir), "scheme": SCHEMES[scheme]}
    made = run_tool_script(python, SCRIPT, request, f"llm-compressor ({scheme} of {model_dir})", "ftpipe quantize-env PATH", timeout_s, QuantizeError)
    for source in model_dir.iterdir():
        if source.is_file() and source.name != "config.json" and not source.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(source, out_dir / source.name)
    ensure_index(out_dir)
    return made


def quantize_and_score(export: ExportSection, section: EvaluationSection, model_section: ModelSection, trained, data,
                       evaluation: EvalResult, out_dir: str | Path) -> EvalResult:
    """Merge the adapter into the 16-bit base, quantize it, and score it on the held-out suite as the candidate was:
    the evaluation gains quantized.<metric> (and quantized.token_agreement) for the gates, and what was done."""
    out_dir = Path(out_dir)
    if problems := quantize_env_problems(export.quantize):
        raise QuantizeError(problems[0])
    python = quantize_python()
    merged_dir, quantized_dir = out_dir / "merged-16bit", out_dir / export.quantize
    merge_adapter(export, model_section, trained, merged_dir)
    made = quantize_model(merged_dir, quantized_dir, export.quantize, python)
    suite = next(s for s in section.suites if s.name == HELD_OUT_SUITE)
    rows = suite_rows(suite, data, section.max_samples)
    scores = _score_quantized(quantized_dir, suite, rows, section)
    metrics = {f"{QUANTIZED}.{k}": v for k, v in scores.metrics.items()}
    reference = _candidate_outputs(evaluation.report_path)
    if scores.outputs and reference:
        metrics[f"{QUANTIZED}.token_agreement"] = token_agreement(_tokenizer(quantized_dir), scores.outputs, reference)
    info = {"scheme": export.quantize, "llmcompressor_scheme": SCHEMES[export.quantize], **made,
            "path": str(quantized_dir), "examples": len(rows),
            "weights_bytes": _weights_bytes(quantized_dir), "unquantized_weights_bytes": _weights_bytes(merged_dir),
            "delta": {k: round(v - evaluation.candidate[unquantized_name(k)], 6) for k, v in metrics.items()
                      if unquantized_name(k) in evaluation.candidate},
            "scored_as": "the compressed-tensors checkpoint read by transformers, its weights dequantized from the quantized "
                         "values, in the dtype the 16-bit candidate was scored in (activations not quantized)"}
    shutil.rmtree(merged_dir, ignore_errors=True)
    atomic_write_json(out_dir / "report.json", {"metrics": metrics, **info, "outputs": scores.outputs})
    log.info("quantized %s: %s", export.quantize, metrics)
    return replace(evaluation, quantized=metrics, quantization=info)


def unquantized_name(key: str) -> str:
    """quantized.<metric> -> <metric>: the 16-bit candidate's name for the same score."""
    return key.removeprefix(f"{QUANTIZED}.")


def _score_quantized(model_dir: Path, suite, rows: list[dict], section: EvaluationSection):
    """In the dtype the candidate was scored in (load_model's), so the delta is quantization's alone."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from evaluation.generate import load_model

    model = load_model(str(model_dir), quantization_config=CompressedTensorsConfig(dequantize=True))
    with judging(section) as judge:
        return score_suite(model, _tokenizer(model_dir), suite, rows, section, judge=judge)


def _tokenizer(model_dir: Path):
    from training.models import load_saved_tokenizer

    return load_saved_tokenizer(model_dir)


def _candidate_outputs(report_path: str) -> list[str]:
    """The 16-bit candidate's answers on the held-out suite, as evaluation recorded them."""
    suite = json.loads(Path(report_path).read_text())["suites"].get(HELD_OUT_SUITE, {})
    return [example.get("candidate_output", "") for example in suite.get("per_example", [])]


def token_agreement(tokenizer, outputs: list[str], reference: list[str]) -> float:
    """The share of answer tokens equal to the reference answer's token at the same position (over the longer of
    the two answers; two empty answers agree)."""
    shares = []
    for output, expected in zip(outputs, reference, strict=True):
        a = tokenizer.encode(output, add_special_tokens=False)
        b = tokenizer.encode(expected, add_special_tokens=False)
        longest = max(len(a), len(b))
        shares.append(1.0 if longest == 0 else sum(x == y for x, y in zip(a, b)) / longest)
    return round(sum(shares) / len(shares), 4) if shares else float("nan")


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
