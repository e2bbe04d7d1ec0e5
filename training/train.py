"""The training stage: resolve the base model, then train the adapter in a worker process."""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_prep.prepare import PreparedData, read_jsonl
from data_prep.formats import row_texts
from data_prep.readers import DataError
from recipes.schema import DataSection, ModelSection, TrackingSection, TrainingSection
from training.backends import BackendError
from training.checkpoints import latest_good
from training.launch import worker_command
from training.families import UnsupportedFamilyError
from training.models import BaseModelRef, ModelLoadError, load_tokenizer, resolve_base
from training.progress import StepReport, parse_step_line
from training.tokenize import MaskingError

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")  # the last line of a Python traceback


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    """What training hands to evaluation and export."""

    base: BaseModelRef
    adapter_path: str
    tokenized_sample_path: str
    metrics: dict

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "adapter_path": self.adapter_path,
                "tokenized_sample_path": self.tokenized_sample_path, "metrics": self.metrics}


def training_corpus(data: PreparedData) -> list[str]:
    """The text a tiny model's tokenizer is trained on: every message of the training rows."""
    return [text for row in read_jsonl(data.train_path) for text in row_texts(row)]


def resolve_base_for(model: ModelSection, data: PreparedData) -> BaseModelRef:
    """The base model (a tiny one built from the prepared text, keyed by the data's cache key)."""
    return resolve_base(model, lambda: training_corpus(data), corpus_key=data.cache_key)


def filter_for_model(data: PreparedData, data_section: DataSection, model: ModelSection, training: TrainingSection,
                     base: BaseModelRef) -> PreparedData:
    """The token-length filter with the base model's tokenizer and chat template (max_tokens defaults to
    training.max_seq_length); filtering again with the same model and limits is a no-op."""
    from data_prep.tokens import filter_token_lengths

    max_tokens = data_section.max_tokens or training.max_seq_length
    return filter_token_lengths(data, data_section, load_tokenizer(base, model), max_tokens,
                                tokenizer_id=f"{base.path}@{base.revision}|{model.chat_template}|{sorted(model.chat_template_kwargs.items())}|{model.template_date}")


def train(
    training: TrainingSection,
    model: ModelSection,
    tracking: TrackingSection,
    data: PreparedData,
    out_dir: str | Path,
    base: BaseModelRef | None = None,
    run_name: str = "ftpipe",
    run_config: dict | None = None,
    on_progress: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train a LoRA/QLoRA adapter on the prepared data; checkpoints and the adapter land in out_dir.
    The base model is resolved from the recipe unless the caller already did (the flow does, once).
    on_progress(report) is called as the worker logs its steps (training.progress)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base or resolve_base(model, lambda: training_corpus(data))
    spec = {
        "training": training.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "tracking": tracking.model_dump(mode="json"),
        "base": base.to_dict(),
        "train_path": data.train_path,
        "overlong": data.overlong,
        "run_dir": str(out_dir),
        "run_name": run_name,
        "run_config": run_config,
        "result_path": str(out_dir / "result.json"),
        "render_date": run_render_date(out_dir),
    }
    found = latest_good(out_dir / "checkpoints")  # decided once here, not by each of several processes
    spec["resume_from"] = {"checkpoint": str(found[0]), "step": found[1]} if found else None
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    (out_dir / "result.json").unlink(missing_ok=True)
    _run_worker(worker_command(training.distributed, spec_path), out_dir / "train.log", on_progress)
    metrics = json.loads((out_dir / "result.json").read_text())
    if "error" in metrics:
        raise {"MaskingError": MaskingError, "ModelLoadError": ModelLoadError, "DataError": DataError,
               "UnsupportedFamilyError": UnsupportedFamilyError, "BackendError": BackendError}[metrics["error"]](metrics["message"])
    return TrainResult(base=base, adapter_path=metrics.pop("adapter_path"),
                       tokenized_sample_path=str(out_dir / "tokenized_sample.json"), metrics=metrics)


def run_render_date(out_dir: Path) -> str:
    """The date chat templates render in this run folder: the first attempt's (UTC) date, kept for every retry and
    resume, so a template that prints today's date tokenizes the same when the run continues on another day."""
    path = out_dir / "render_date.txt"
    if path.is_file():
        return path.read_text().strip()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path.write_text(today)
    return today


def _run_worker(command: list[str], log_path: Path, on_progress: Callable[[StepReport], None] | None = None) -> None:
    """Run training in child processes, relaying their output line by line to this logger and a log file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    tail: list[str] = []
    first_error = None  # with several processes, the root cause scrolls away behind the launcher's report
    with log_path.open("w", encoding="utf-8") as log_file, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace",
    ) as proc:
        for line in proc.stdout:
            log_file.write(line)
            line = line.rstrip()
            if line and not _noise(line):
                log.info("%s", line)
                tail = (tail + [line])[-15:]
                first_error = first_error or (line if ERROR_LINE.match(line) else None)
            if on_progress and (report := parse_step_line(line)):
                on_progress(report)
    if proc.returncode != 0:
        cause = f"first error: {first_error}\n" if first_error and first_error not in tail else ""
        raise TrainingError(f"training worker failed (exit {proc.returncode}); {cause}last lines:\n" + "\n".join(tail) + f"\nfull log: {log_path}")


def _noise(line: str) -> bool:
    """Library chatter that says nothing about this run."""
    return line.startswith("{'loss'") or any(s in line for s in ("is an Enum subclass", "register_constant()", "it/s]", "Disabling Tensorflow"))
