"""wandb tracking of a run: training logs into a run, evaluation adds its metrics to the same run afterwards."""
from __future__ import annotations

import os
from pathlib import Path

from recipes.schema import TrackingSection


def start_run(tracking: TrackingSection, name: str, config: dict, run_dir: Path):
    """A wandb run with the resolved recipe as its config (None when tracking is disabled)."""
    if tracking.mode == "disabled":
        return None
    import wandb

    os.environ["WANDB_MODE"] = tracking.mode
    os.environ.setdefault("WANDB_SILENT", "true")
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=tracking.project, name=name, config=config, dir=str(run_dir), mode=tracking.mode)


def finish_run(run) -> dict | None:
    """Where the run is (its URL online, its folder offline) and how to find it again."""
    if run is None:
        return None
    info = {"id": run.id, "project": run.project, "mode": run.settings.mode, "dir": str(Path(run.dir).parent),
            "url": run.url if run.settings.mode == "online" else None}
    run.finish()
    return info


def log_evaluation(info: dict | None, metrics: dict[str, float]) -> None:
    """Add evaluation metrics to the training's run (resumed by id; offline, a folder `wandb sync` merges)."""
    if not info:
        return
    import wandb

    run_dir = Path(info["dir"]).parent.parent  # <run_dir>/wandb/<run folder>
    run = wandb.init(project=info["project"], id=info["id"], resume="allow", dir=str(run_dir), mode=info["mode"])
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()
