"""The training process: `python -m training.worker SPEC.json` trains one adapter and writes RESULT.json.

Training runs in its own process because unsloth patches transformers and trl globally on import: the
`hf` backend must run unpatched, and the parent (Prefect, evaluation) must not inherit the patches.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

from recipes.schema import SHARDED_STRATEGIES
from training.backends import BackendError, choose_backend
from training.launch import rank

log = logging.getLogger("training.worker")


def main(spec_path: str) -> None:
    # Under accelerate launch every process runs this; rank 0 speaks for all of them and writes the results.
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    spec = json.loads(Path(spec_path).read_text())
    from recipes.schema import TrainingSection

    try:
        backend, why = choose_backend(TrainingSection.model_validate(spec["training"]))
    except BackendError as exc:
        Path(spec["result_path"]).write_text(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers, trl and peft)
    log.info("backend: %s (%s)", backend, why)
    from data_prep.readers import DataError
    from training.families import UnsupportedFamilyError
    from training.models import ModelLoadError, refused_input
    from training.tokenize import MaskingError

    try:
        result = run(spec, backend, why)
    except (MaskingError, ModelLoadError, DataError, UnsupportedFamilyError) as exc:  # input problems: hand them back as themselves
        result = {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:
        if (refused := refused_input(exc)) is None:
            raise
        result = {"error": "ModelLoadError", "message": str(refused)}
    if rank() == 0:
        Path(spec["result_path"]).write_text(json.dumps(result, indent=2))


def run(spec: dict, backend: str, why: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    from data_prep.files import atomic_write_json
    from data_prep.prepare import read_jsonl
    from recipes.schema import ModelSection, TrackingSection, TrainingSection
    from training.backends import load_hf, load_unsloth
    from data_prep.charts import draw_curve
    from evaluation.costs import cpu_seconds
    from training.tracking import finish_run, start_run
    from training.models import BaseModelRef, load_tokenizer, save_render_settings
    from training.tokenize import reasoning_mode
    from training.sft import build_trainer, check_collated_batch, check_packing_isolated, tokenize_rows

    training = TrainingSection.model_validate(spec["training"])
    model_section = ModelSection.model_validate(spec["model"])
    tracking = TrackingSection.model_validate(spec["tracking"])
    ref = BaseModelRef(**spec["base"])
    run_dir = Path(spec["run_dir"])
    set_seed(training.seed)
    _quiet_progress_bars()

    tokenizer = load_tokenizer(ref, model_section, render_date=spec.get("render_date"))
    rows = read_jsonl(spec["train_path"])
    tokenized = tokenize_rows(tokenizer, rows, training, run_dir, spec.get("overlong", "drop"))
    main_process = rank() == 0
    if main_process:
        atomic_write_json(run_dir / "tokenized_sample.json", tokenized.sample)
    loader = load_unsloth if backend == "unsloth" else load_hf
    model = loader(ref, training, model_section.trust_remote_code, tokenizer)
    quantized_layers = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    dataset = Dataset.from_list(tokenized.examples)
    wandb_run = start_run(tracking, spec["run_name"], spec.get("run_config") or {}, run_dir) if main_process else None
    trainer, stats = build_trainer(model, tokenizer, dataset, training, run_dir, report_to=["wandb"] if wandb_run else [],
                                   whole_text=tokenized.whole_text)
    check_collated_batch(trainer, tokenized.examples, tokenizer.eos_token_id, training)
    packing_difference = check_packing_isolated(trainer, tokenized.examples) if training.packing else None

    resume = spec.get("resume_from") or {}
    checkpoint, resumed_step = resume.get("checkpoint"), resume.get("step", 0)
    if checkpoint:
        log.info("resumed from checkpoint at step %d (%s)", resumed_step, checkpoint)
    del rows
    gc.collect()
    gc.freeze()  # what setup left behind is never scanned again by the collector during the training steps
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.perf_counter() - started
    tokens_seen = _summed_over_processes(trainer, stats.tokens)
    replicas = _replica_difference(trainer, training.distributed.strategy)

    worker_cpu_s = _summed_over_processes(trainer, int(cpu_seconds() * 1000)) / 1000  # the run's cost on a CPU machine

    adapter_dir = run_dir / "adapter"
    save_adapter(trainer, adapter_dir, training.distributed.strategy)
    if not main_process:
        return {}
    tokenizer.save_pretrained(adapter_dir)
    save_render_settings(tokenizer, adapter_dir)
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    losses = [loss for _, loss in curve]
    if curve:
        draw_curve(curve, "training loss by step", run_dir / "loss_curve.png")
    result = {
        "adapter_path": str(adapter_dir),
        "backend": backend,
        "backend_reason": why,
        "method": training.method,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "adapter": training.adapter,
        "base_4bit_layers": quantized_layers,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": output.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "final_logged_loss": losses[-1] if losses else None,
        "runtime_s": round(runtime, 3),
        "train_rows": tokenized.rows,
        "train_examples": len(tokenized.examples),
        "chat_template": {**tokenizer.ftpipe_render.to_dict(), "reasoning": reasoning_mode(tokenizer),
                          "per_turn_rows": tokenized.per_turn_rows, "end_of_turn": tokenizer.eos_token},
        "dropped_rows": tokenized.dropped,
        "truncated_rows": tokenized.truncated,
        "train_tokens": tokenized.total_tokens,
        "trained_token_fraction": tokenized.trained_fraction,
        "batch_trained_fraction": stats.summary(),
        "best_logged_loss": min(losses) if losses else None,
        "loss_curve": [[step, loss] for step, loss in curve],
        "loss_curve_png": str(run_dir / "loss_curve.png") if curve else None,
        "tokens_seen": tokens_seen,
        "peak_memory_mb": _peak_memory_mb(),
        "tokens_per_s": round(tokens_seen / runtime, 1) if runtime else None,
        "worker_cpu_s": worker_cpu_s,
        "distributed": {"num_processes": trainer.accelerator.num_processes, "strategy": training.distributed.strategy,
                        "model_wrapper": type(trainer.model_wrapped).__name__,
                        "replica_max_difference": replicas,
                        "process_group": _process_group_backend()},
        "resumed_from": Path(checkpoint).name if checkpoint else None,  # a name: rotation deletes the folder later
        "resumed_at_step": resumed_step,
        "packing_isolation_max_logit_diff": packing_difference,
        "wandb": finish_run(wandb_run),
    }
    if training.method == "dpo":
        from training.dpo import preference_metrics

        result["preference"] = preference_metrics(trainer.state.log_history)
    log.info("trained %d steps in %.1fs, loss %.4g", result["steps"], runtime, result["final_logged_loss"] or float("nan"))
    return result


def save_adapter(trainer, adapter_dir: Path, strategy: str) -> None:
    """The trained adapter alone (not trl's frozen DPO reference copy). Sharded strategies gather the weights
    through the Trainer, a collective every process joins; otherwise rank 0 writes it."""
    import shutil

    from training.dpo import REFERENCE_ADAPTER

    if strategy in SHARDED_STRATEGIES:
        trainer.save_model(str(adapter_dir))
        if trainer.accelerator.is_main_process:
            shutil.rmtree(adapter_dir / REFERENCE_ADAPTER, ignore_errors=True)
    elif trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(adapter_dir, selected_adapters=["default"])
    if trainer.accelerator.is_main_process:
        canonical_adapter_config(adapter_dir / "adapter_config.json")


def canonical_adapter_config(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which differs between processes: sorted, the
    same adapter gives the same bytes, so an unchanged recipe registers the same version."""
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):  # sets in peft; trainable_token_indices' order is meaningful
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _summed_over_processes(trainer, count: int) -> int:
    import torch

    return int(trainer.accelerator.reduce(torch.tensor(count, device=trainer.accelerator.device), reduction="sum").item())


def _replica_difference(trainer, strategy: str) -> float | None:
    """How far the processes' trained weights drifted apart: DDP and ZeRO-2 keep full copies equal, so anything
    above 0 means the gradients were not synchronised. None where each process holds a shard (fsdp, ZeRO-3)."""
    import torch


    if strategy in SHARDED_STRATEGIES:
        return None
    trained = [p.detach().float() for p in trainer.model.parameters() if p.requires_grad]
    summary = torch.stack([sum(p.sum() for p in trained), sum((p * p).sum() for p in trained)]).to(trainer.accelerator.device)
    gathered = trainer.accelerator.gather(summary[None]).reshape(-1, 2)
    return float((gathered - gathered[0]).abs().max())


def _process_group_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _peak_memory_mb() -> dict:
    """Peak GPU memory allocated by tensors on CUDA; off GPU, the training process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {"device": "cpu (process RSS)", "mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _quiet_progress_bars() -> None:
    """Per-step progress bars are noise in a relayed log; the loss callback reports progress instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    main(sys.argv[1])
