"""The deployments: what `ftpipe serve` serves from this machine and what prefect.yaml declares for work pools."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import Flow, serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.compare import compare_models
from flows.finetune import GPU_LIMIT, finetune, prepare
from flows.monitor import monitor
from flows.releases import watch_releases
from recipes.schema import schedule_seconds

FLOWS: dict[str, Flow] = {"finetune": finetune, "prepare": prepare, "compare-models": compare_models, "monitor": monitor,
                          "watch-releases": watch_releases}
DESCRIPTIONS = {
    "finetune": "Recipe -> data -> LoRA/QLoRA -> evaluation gates -> vLLM-ready artifact -> registry; pauses for approval when the recipe or the model's registry policy asks.",
    "prepare": "The data stage alone: validation, quarantine, cleaning, de-duplication, split and report.",
    "compare-models": "One recipe over several base models: a leaderboard with deltas against production, training time and "
                      "cost; the best by the recipe's objective can go on to gates, export and approval.",
    "monitor": "Production's outputs (canary suite through the endpoint, sampled traffic) scored as at release: drift, "
               "thresholds; a breach emits an event, is recorded in the audit log and rolls back where the policy allows.",
    "watch-releases": "Candidate bases checked for new releases; a new one is tuned and compared with production, and a "
                      "review (a finetune run paused for approval) opens when it is better beyond noise.",
}


def deployments(output_dir: str | Path, scheduled: list[Scheduled] = ()) -> list[RunnerDeployment]:
    """One deployment per flow, parameters checked by the flow itself (so a bad recipe is refused with the recipe's
    own error lines, not a JSON-schema message) and run folders under `output_dir` on this machine; then the
    scheduled ones (`ftpipe serve --monitor MODEL`, `--watch RECIPE`)."""
    return [_deployment(name, FLOWS[name], {}, output_dir) for name in FLOWS] + [
        _deployment(s.name, FLOWS[s.flow], s.parameters, output_dir, s.every) for s in scheduled]


@dataclass(frozen=True)
class Scheduled:
    """A deployment that runs on a schedule: monitor-<model> or watch-<recipe>."""

    name: str
    flow: str
    parameters: dict
    every: str  # 30s, 15m, 1h, 1d or a cron expression


def _deployment(name: str, flow: Flow, parameters: dict, output_dir: str | Path, every: str | None = None) -> RunnerDeployment:
    seconds = schedule_seconds(every) if every else None
    return flow.to_deployment(name=name, description=DESCRIPTIONS.get(name) or DESCRIPTIONS[flow.name], tags=["ftpipe"],
                              parameters={**parameters, "output_dir": str(Path(output_dir).resolve())},
                              interval=seconds, cron=every if every and seconds is None else None,
                              enforce_parameter_schema=True, entrypoint_type=EntrypointType.MODULE_PATH)


def set_gpu_limit(slots: int) -> None:
    """The global concurrency limit every training task takes a slot of: at most `slots` train at once."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


CRASH_DETECTION = "ftpipe: crash flow runs that stop sending heartbeats"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set by the command line for every flow it runs or serves
MISSED_HEARTBEATS_S = 3 * HEARTBEAT_S


def ensure_crash_detection() -> None:
    """Prefect's zombie-run automation, once per server: a flow run whose process died (SIGKILL, OOM, a lost node)
    stops sending heartbeats and is set Crashed, instead of staying Running for ever."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(CRASH_DETECTION):
            return
    Automation(
        name=CRASH_DETECTION,
        description="A flow run with no heartbeat (nor end) within 90 s of the last one is Crashed (ftpipe serve / run).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat from the flow run's process: it died")],
    ).create()


def serve_deployments(output_dir: str | Path, gpus: int, limit: int | None, scheduled: list[Scheduled] = ()) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until interrupted."""
    set_gpu_limit(gpus)
    ensure_crash_detection()
    serve(*deployments(output_dir, scheduled), limit=limit)
