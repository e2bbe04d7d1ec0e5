"""The reviewer's promotion decision: the flow pauses with a typed input form (Prefect's pause_flow_run) until a
listed reviewer approves or rejects, or the time runs out. `ftpipe approve` resumes it through the API."""
from __future__ import annotations

import math
import time
from enum import Enum

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from recipes.schema import ApprovalSection


class Decision(str, Enum):
    """An enum, not a Literal: Prefect's UI offers an enum's values in a drop-down."""

    approve = "approve"
    reject = "reject"


class PromotionDecision(RunInput):
    """The form a reviewer fills in the Prefect UI (or `ftpipe approve` sends)."""

    decision: Decision = Field(description="approve promotes the candidate; reject does not.")
    reviewer: str = Field(description="Your name as listed in the recipe's approval.reviewers.")
    comment: str = Field("", description="Why; kept in manifest.json and the model card.")


class PromotionRefused(RuntimeError):
    """The model was not promoted: a reviewer rejected it, or no decision came in time."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def not_required() -> dict:
    return {"required": False, "decision": "not required (development recipe)", "reviewer": None, "comment": "",
            "decided_at": now(), "promoted": True, "refused": []}


def wait_for_decision(approval: ApprovalSection, request_markdown: str) -> dict:
    """Pause until a listed reviewer decides; answers from others are refused (logged, shown as an artifact) and the
    run pauses again. Returns the approval record for the manifest."""
    logger = get_run_logger()
    create_markdown_artifact(key="approval-request", markdown=request_markdown, description="Waiting for a reviewer's decision")
    deadline = time.monotonic() + approval.timeout_hours * 3600
    refused: list[dict] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            answer = pause_flow_run(wait_for_input=PromotionDecision, timeout=max(1, math.ceil(remaining)),
                                    poll_interval=max(1, min(10, math.ceil(remaining / 4))))
        except FlowPauseTimeout:
            break
        reviewer = answer.reviewer.strip()
        if reviewer in approval.reviewers:
            promoted = answer.decision is Decision.approve
            return {"required": True, "decision": "approved" if promoted else "rejected", "reviewer": reviewer,
                    "comment": answer.comment, "decided_at": now(), "promoted": promoted, "refused": refused}
        message = f"refused a decision from {reviewer!r}: only {', '.join(approval.reviewers)} may decide; still waiting"
        logger.warning(message)
        refused.append({"reviewer": reviewer, "decision": answer.decision.value, "at": now()})
        create_markdown_artifact(key="approval-refused", markdown=f"# Decision refused\n{message}")
    return {"required": True, "decision": "timed out", "reviewer": None, "comment": f"no decision within {approval.timeout_hours:g} h",
            "decided_at": now(), "promoted": False, "refused": refused}


def refusal_message(record: dict) -> str:
    if record["decision"] == "rejected":
        return f"not promoted: rejected by {record['reviewer']}" + (f": {record['comment']}" if record["comment"] else "")
    return f"not promoted: {record['comment']}"


INPUT_WAIT_S = 60  # the paused run saves its input form right after pausing; a resume before that is refused


def read_paused_run(run_id, reviewer: str):
    """(the flow run, None) when it waits for a decision this reviewer may give, else (run or None, why not)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None, f"flow run {run_id} not found on {client.api_url}"
    if run.state is None or not run.state.is_paused():
        return run, f"flow run {run_id} is not waiting for a decision (state: {run.state.name if run.state else 'none'})"
    reviewers = ((run.parameters.get("recipe") or {}).get("approval") or {}).get("reviewers") or []
    if reviewer.strip() not in reviewers:
        return run, f"{reviewer!r} is not a reviewer of this run; its recipe lists: {', '.join(reviewers) or 'nobody'}"
    return run, None


def resume_with_decision(run, decision: PromotionDecision) -> None:
    """Resume through the API, once the run has saved its input form (resuming before that is refused)."""
    from prefect.flow_runs import resume_flow_run
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    keyset = keyset_from_paused_state(run.state)
    deadline = time.monotonic() + INPUT_WAIT_S
    while read_flow_run_input(keyset["schema"], flow_run_id=run.id) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    resume_flow_run(run.id, run_input=decision.model_dump())
