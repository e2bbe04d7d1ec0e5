"""The reviewers' promotion decision: the flow pauses with a typed input form (Prefect's pause_flow_run) until enough
reviewers of the model's policy approve with their credentials, one rejects, or the time runs out. `ftpipe approve`
resumes it through the API and reads back whether the flow accepted the answer.

Every answer is checked against the policy (reviewer listed, token matching the SHA-256 the policy keeps, not the
run's own submitter) and recorded in the model's audit log, refusals too. The stored form answer holds the token, so
the flow deletes it as soon as it is read; the log keeps the credential id, never the token.
"""
from __future__ import annotations

import math
import time
from enum import Enum
from typing import Callable

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, SecretStr, ValidationError

from governance.runs import RunGovernance

PAUSE_PREFIX = "decision-"
OUTCOME_PREFIX = "outcome-"


class Decision(str, Enum):
    """An enum, not a Literal: Prefect's UI offers an enum's values in a drop-down."""

    approve = "approve"
    reject = "reject"


class PromotionDecision(RunInput):
    """The form a reviewer fills in the Prefect UI (or `ftpipe approve` sends)."""

    decision: Decision = Field(description="approve promotes the candidate once enough reviewers approved; reject does not.")
    reviewer: str = Field(description="Your reviewer name in the model's promotion policy.")
    token: SecretStr = Field(description="Your reviewer token, issued by `ftpipe registry policy`; checked, never stored.")
    comment: str = Field("", description="Why; kept in the model's audit log.")


class PromotionRefused(RuntimeError):
    """The model was not promoted: a reviewer rejected it, or no decision came in time."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


Record = Callable[[str, str, dict], None]  # (event, by, data) -> an audit-log entry


def not_required(governance: RunGovernance) -> dict:
    return {"outcome": "not required", "required": False, "approvers": [], "reason": governance.describe(), "decided_at": now()}


def wait_for_decision(governance: RunGovernance, request_markdown: str, form_description: str, submitter: str | None,
                      record: Record) -> dict:
    """Pause until `governance.approvals` reviewers approve, one rejects, or the time runs out; answers that fail
    authentication are refused (recorded, shown as an artifact, the run pauses again). Returns the outcome."""
    logger = get_run_logger()
    create_markdown_artifact(key="approval-request", markdown=request_markdown, description="Waiting for reviewers' decisions")
    deadline = time.monotonic() + governance.timeout_hours * 3600
    approvers: list[dict] = []
    answers = 0
    while (remaining := deadline - time.monotonic()) > 0:
        answers += 1
        key = f"{PAUSE_PREFIX}{answers}"
        form = PromotionDecision.with_initial_data(description=form_description)
        try:
            answer = pause_flow_run(wait_for_input=form, key=key, timeout=max(1, math.ceil(remaining)),
                                    poll_interval=max(1, min(5, math.ceil(remaining / 4))))
        except FlowPauseTimeout:
            break
        except ValidationError as exc:  # the server checks answers against the form's schema; this is a second line
            _forget_answer(key)
            why = f"a malformed answer ({exc.error_count()} problem(s): {exc.errors()[0]['loc']})"
            record("decision_refused", "unknown", {"claimed_reviewer": None, "decision": None, "reason": why})
            _tell_sender(key, {"accepted": False, "reason": why})
            continue
        _forget_answer(key)
        reviewer, why = governance.authenticate(answer.reviewer, answer.token.get_secret_value(), submitter)
        if reviewer is not None and reviewer.name in {a["reviewer"] for a in approvers}:
            reviewer, why = None, f"{reviewer.name!r} already approved this run; another reviewer must"
        if reviewer is None:
            logger.warning("refused a decision (%s): %s; still waiting", answer.decision.value, why)
            record("decision_refused", answer.reviewer.strip()[:64], {"claimed_reviewer": answer.reviewer.strip()[:64],
                                                                      "decision": answer.decision.value, "reason": why})
            create_markdown_artifact(key="approval-refused", markdown=f"# Decision refused\n{why}; still waiting")
            _tell_sender(key, {"accepted": False, "reason": why})
            continue
        vote = {"reviewer": reviewer.name, "credential_id": reviewer.credential_id, "decision": answer.decision.value,
                "comment": answer.comment, "decided_at": now()}
        record("decision", reviewer.name, vote)
        if answer.decision is Decision.reject:
            _tell_sender(key, {"accepted": True, "outcome": "rejected"})
            return {"outcome": "rejected", "required": True, "approvers": approvers, "rejected_by": vote, "decided_at": now()}
        approvers.append(vote)
        done = len(approvers) >= governance.approvals
        _tell_sender(key, {"accepted": True, "outcome": "approved" if done else
                           f"approval {len(approvers)} of {governance.approvals} recorded; waiting for more"})
        if done:
            return {"outcome": "approved", "required": True, "approvers": approvers, "decided_at": now()}
        logger.info("approval %d of %d from %s; waiting for another reviewer", len(approvers), governance.approvals, reviewer.name)
    return {"outcome": "timed out", "required": True, "approvers": approvers, "decided_at": now(),
            "reason": f"no decision within {governance.timeout_hours:g} h"}


def refusal_message(outcome: dict) -> str:
    if outcome["outcome"] == "rejected":
        vote = outcome["rejected_by"]
        return f"not promoted: rejected by {vote['reviewer']}" + (f": {vote['comment']}" if vote["comment"] else "")
    return f"not promoted: {outcome.get('reason') or outcome['outcome']}"


def _forget_answer(key: str) -> None:
    """Delete the stored form answer: it holds the reviewer's token."""
    from prefect.input.actions import delete_flow_run_input
    from prefect.input.run_input import keyset_from_base_key

    delete_flow_run_input(keyset_from_base_key(f"paused-{key}")["response"])


def _tell_sender(key: str, outcome: dict) -> None:
    """What became of an answer, for `ftpipe approve` (it reads `outcome-<pause key>`)."""
    from prefect.input.actions import create_flow_run_input

    create_flow_run_input(f"{OUTCOME_PREFIX}{key}", outcome)


INPUT_WAIT_S = 60  # the paused run saves its input form right after pausing; a resume before that is refused
OUTCOME_WAIT_S = 120  # the paused run polls every 5 s at most, then checks the answer


def read_paused_run(run_id):
    """(the flow run, None) when it waits for a decision, else (run or None, why not)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None, f"flow run {run_id} not found on {client.api_url}"
    pause_key = run.state.state_details.pause_key if run.state is not None else None
    if run.state is None or not run.state.is_paused() or not str(pause_key).startswith(PAUSE_PREFIX):
        return run, f"flow run {run_id} is not waiting for a promotion decision (state: {run.state.name if run.state else 'none'})"
    return run, None


def resume_with_decision(run, decision: PromotionDecision) -> dict:
    """Resume through the API once the run has saved its input form, then wait for the flow's verdict on the answer."""
    from prefect.flow_runs import resume_flow_run
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    keyset = keyset_from_paused_state(run.state)
    deadline = time.monotonic() + INPUT_WAIT_S
    while read_flow_run_input(keyset["schema"], flow_run_id=run.id) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    resume_flow_run(run.id, run_input={**decision.model_dump(mode="json"), "token": decision.token.get_secret_value()})
    outcome_key = f"{OUTCOME_PREFIX}{run.state.state_details.pause_key}"
    deadline = time.monotonic() + OUTCOME_WAIT_S
    while (outcome := read_flow_run_input(outcome_key, flow_run_id=run.id)) is None:
        if time.monotonic() > deadline:
            return {"accepted": False, "reason": f"the run did not acknowledge the answer within {OUTCOME_WAIT_S} s; "
                                                 "see its logs and the approval-refused artifact"}
        time.sleep(1)
    return outcome
