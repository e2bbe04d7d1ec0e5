"""The deployments: what `ftpipe serve` serves from this machine and what prefect.yaml declares for work pools."""
from __future__ import annotations

from pathlib import Path

from prefect import Flow, serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.compare import compare_models
from flows.finetune import GPU_LIMIT, finetune, prepare

FLOWS: dict[str, Flow] = {"finetune": finetune, "prepare": prepare, "compare-models": compare_models}
DESCRIPTIONS = {
    "finetune": "Recipe -> data -> LoRA/QLoRA -> evaluation gates -> vLLM-ready artifact -> registry; pauses for approval when the recipe or the model's registry policy asks.",
    "prepare": "The data stage alone: validation, quarantine, cleaning, de-duplication, split and report.",
    "compare-models": "One recipe over several base models: a leaderboard with deltas against production, training time and "
                      "cost; the best by the recipe's objective can go on to gates, export and approval.",
}


def deployments(output_dir: str | Path) -> list[RunnerDeployment]:
    """One deployment per flow, parameters checked by the flow itself (so a bad recipe is refused with the recipe's
    own error lines, not a JSON-schema message) and run folders under `output_dir` on this machine."""
    return [flow.to_deployment(name=name, description=DESCRIPTIONS[name], tags=["ftpipe"],
                               parameters={"output_dir": str(Path(output_dir).resolve())},
                               enforce_parameter_schema=True, entrypoint_type=EntrypointType.MODULE_PATH)
            for name, flow in FLOWS.items()]


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


def serve_deployments(output_dir: str | Path, gpus: int, limit: int | None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until interrupted."""
    set_gpu_limit(gpus)
    ensure_crash_detection()
    serve(*deployments(output_dir), limit=limit)
