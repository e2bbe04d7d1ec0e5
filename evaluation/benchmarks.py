"""Standard benchmarks with lm-evaluation-harness on the base model and on the merged artifact (optional extra).

They run after export because the harness loads a model folder: the merged model is exactly what ships.
Results are reported side by side in the manifest; gates use the evaluation suites, which run before export.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from data_prep.files import atomic_write_json
from recipes.schema import LmEvalSection

log = logging.getLogger(__name__)


def run_lm_eval(section: LmEvalSection, models: dict[str, str], out_dir: str | Path) -> dict:
    """{model label: {task: {metric: value}}} for each model folder; the harness's full results (without the
    per-sample records) are written to out_dir/lm_eval_<label>.json."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out_dir = Path(out_dir)
    manager = TaskManager(include_path=section.include_path) if section.include_path else TaskManager()
    scores = {}
    for label, path in models.items():
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={path},dtype={_dtype()}", tasks=section.tasks, task_manager=manager,
            num_fewshot=section.num_fewshot, limit=section.limit, batch_size=section.batch_size,
            apply_chat_template=section.apply_chat_template, system_instruction=section.system_instruction, device=_device(),
        )
        results.pop("samples", None)
        atomic_write_json(out_dir / f"lm_eval_{label}.json", json.loads(json.dumps(results, default=str)))
        scores[label] = {task: _metrics(values) for task, values in results["results"].items()}
    log.info("lm-evaluation-harness: %s", scores)
    return scores


def _metrics(values: dict) -> dict[str, float]:
    """`exact_match,none` -> `exact_match`; standard errors and labels dropped."""
    return {key.split(",")[0]: float(value) for key, value in values.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"
