"""A registered model's promotion policy: who must approve, how many approvals, which gates every run must pass.

The policy lives in the model's audit log (the latest `policy` entry), set by `ftpipe registry policy`, never by the
run it governs: a run's recipe and overrides may add gates or narrow the reviewers, and are refused before any work
when they would drop approval, loosen a mandatory gate or name a reviewer the policy does not list.

Reviewers authenticate with a token issued once by `ftpipe registry policy`; the policy keeps its SHA-256 and a
credential id, never the token. A typed name alone is never an identity.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recipes.schema import Gate, MonitorThreshold

NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
TOKEN_PREFIX = "ftpipe_"
SHORTHAND = re.compile(r"^\s*([a-z0-9_.]+)\s*(>=|<=)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


class Reviewer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)
    credential_id: str
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    login: str | None = Field(None, description="The person's login where a run's submitter is known (default: name).")

    def is_login(self, who: str | None) -> bool:
        return bool(who) and who in (self.name, self.login)


class Policy(BaseModel):
    """What a model's promotion requires. The default (no policy entry yet) requires nothing beyond the run's recipe."""

    model_config = ConfigDict(extra="forbid")

    require_approval: bool = False
    approvals: int = Field(1, ge=1, le=10)
    reviewers: list[Reviewer] = Field(default_factory=list)
    gates: list[Gate] = Field(default_factory=list)
    rollback_on_breach: bool = Field(False, description="A monitoring breach of the production version moves production back "
                                     "to the version before it (set here, never by the run that monitors).")
    monitor_thresholds: list[MonitorThreshold] = Field(default_factory=list, description="Monitoring thresholds every version is "
                                                       "checked against on top of its recipe's (a recipe cannot drop them).")

    @model_validator(mode="after")
    def _enough_reviewers(self) -> "Policy":
        names = [r.name for r in self.reviewers]
        if len(set(names)) != len(names):
            raise ValueError(f"each reviewer once (got {', '.join(names)})")
        if self.require_approval and len(self.reviewers) < self.approvals:
            raise ValueError(f"{self.approvals} approval(s) required but {len(self.reviewers)} reviewer(s) named: add "
                             "reviewers with --reviewer NAME")
        return self

    def reviewer(self, name: str) -> Reviewer | None:
        return next((r for r in self.reviewers if r.name == name), None)

    def describe(self) -> str:
        approval = (f"{self.approvals} approval(s) from {', '.join(r.name for r in self.reviewers)}" if self.require_approval
                    else "no approval required")
        gates = "; ".join(describe_gate(g) for g in self.gates) or "none"
        monitoring = "; ".join(t.describe() for t in self.monitor_thresholds)
        return (f"{approval}; mandatory gates: {gates}" + (f"; mandatory monitoring thresholds: {monitoring}" if monitoring else "")
                + ("; a monitoring breach rolls production back" if self.rollback_on_breach else ""))


def describe_gate(gate: Gate) -> str:
    described = f"{gate.metric} {gate.kind}" + (f" {gate.no_regression_vs} (tolerance {gate.tolerance:g})"
                                                if gate.kind == "no_regression_vs" else f" {gate.threshold:g}")
    return described + (f" at {gate.confidence:g} confidence" if gate.confidence is not None else "")


def parse_threshold(text: str) -> MonitorThreshold:
    """'traffic.pii_leak_rate<=0' or 'canary.exact_match>=0.9' (a monitoring threshold)."""
    match = SHORTHAND.match(text)
    if not match:
        raise ValueError(f"--monitor-threshold {text!r}: write METRIC>=VALUE or METRIC<=VALUE, e.g. 'traffic.pii_leak_rate<=0'")
    metric, op, value = match.groups()
    try:
        return MonitorThreshold.model_validate({"metric": metric, "min" if op == ">=" else "max": float(value)})
    except ValidationError as exc:
        raise ValueError(f"--monitor-threshold {text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def parse_gate(text: str) -> Gate:
    """'exact_match>=0.9' (min), 'safety.pii_leak_rate<=0' (max), or a gate as YAML ('{metric: ..., no_regression_vs: base}')."""
    if match := SHORTHAND.match(text):
        metric, op, value = match.groups()
        fields = {"metric": metric, "min" if op == ">=" else "max": float(value)}
    else:
        try:
            fields = yaml.safe_load(text)
        except yaml.YAMLError:
            fields = None
        if not isinstance(fields, dict):
            raise ValueError(f"--gate {text!r}: write METRIC>=VALUE, METRIC<=VALUE or a gate mapping like "
                             "'{metric: exact_match, min_delta_vs_base: 0.5}'")
    try:
        return Gate.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(f"--gate {text!r}: {exc.errors()[0]['msg']}") from None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_credential(name: str, login: str | None = None) -> tuple[Reviewer, str]:
    """A new reviewer credential and its token (256 random bits); only the token's SHA-256 is kept."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return Reviewer(name=name, credential_id="cred-" + secrets.token_hex(6), token_sha256=token_sha256(token), login=login), token


def with_changes(current: Policy, *, require_approval: bool | None = None, approvals: int | None = None,
                 reviewers: list[str] | None = None, new_tokens: list[str] = (), gates: list[Gate] | None = None,
                 logins: dict[str, str] | None = None, rollback_on_breach: bool | None = None,
                 monitor_thresholds: list[MonitorThreshold] | None = None) -> tuple[Policy, dict[str, str]]:
    """The policy after a change, and the tokens issued (reviewer -> token): new reviewers and --new-token ones get one;
    listed reviewers who had one keep it; reviewers left out of `reviewers` lose theirs."""
    issued: dict[str, str] = {}
    names = reviewers if reviewers is not None else [r.name for r in current.reviewers]
    if bad := [n for n in names if not re.match(NAME, n)]:
        raise ValueError(f"--reviewer {bad[0]!r}: a name of letters, digits, . _ @ -, starting with a letter or digit")
    unknown = [n for n in new_tokens if n not in names]
    if unknown:
        raise ValueError(f"--new-token {unknown[0]}: not a reviewer of this policy (reviewers: {', '.join(names) or 'none'})")
    kept: list[Reviewer] = []
    for name in names:
        existing = current.reviewer(name)
        login = (logins or {}).get(name, existing.login if existing else None)
        if existing is None or name in new_tokens:
            reviewer, issued[name] = issue_credential(name, login)
        else:
            reviewer = existing.model_copy(update={"login": login})
        kept.append(reviewer)
    try:
        policy = Policy(require_approval=current.require_approval if require_approval is None else require_approval,
                        approvals=current.approvals if approvals is None else approvals, reviewers=kept,
                        gates=current.gates if gates is None else gates,
                        rollback_on_breach=current.rollback_on_breach if rollback_on_breach is None else rollback_on_breach,
                        monitor_thresholds=current.monitor_thresholds if monitor_thresholds is None else monitor_thresholds)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError((f"--{where}: " if where else "") + error["msg"].removeprefix("Value error, ")) from None
    return policy, issued


def authenticate(policy: Policy, reviewer: str, token: str, allowed: list[str], submitter: str | None) -> tuple[Reviewer | None, str]:
    """(the reviewer, "") when `token` is this listed reviewer's credential and they did not start the run; else
    (None, why) — the reason never repeats the token."""
    name = reviewer.strip()
    known = policy.reviewer(name)
    if known is None or (allowed and name not in allowed):
        listed = [r for r in (allowed or [r.name for r in policy.reviewers])]
        return None, f"{name!r} is not a reviewer of this model's promotion policy (reviewers: {', '.join(listed) or 'none'})"
    if not token or not hmac.compare_digest(token_sha256(token.strip()), known.token_sha256):
        return None, f"the credential given for {name!r} is missing or wrong (expected the token of credential {known.credential_id})"
    if known.is_login(submitter):
        return None, f"{name!r} started this run and cannot approve it (submitter: {submitter})"
    return known, ""


def _looser(recipe_gate: Gate, policy_gate: Gate) -> bool:
    """Same metric, kind and reference, with a bound the policy's would refuse."""
    if (recipe_gate.metric, recipe_gate.kind, recipe_gate.reference) != (policy_gate.metric, policy_gate.kind, policy_gate.reference):
        return False
    if policy_gate.confidence is not None and (recipe_gate.confidence or 0) < policy_gate.confidence:
        return True  # a point value, or a narrower interval, for a bound the policy wants beyond noise
    if policy_gate.kind == "no_regression_vs":
        return recipe_gate.tolerance > policy_gate.tolerance
    lower_bound = policy_gate.kind.startswith("min")
    return recipe_gate.threshold < policy_gate.threshold if lower_bound else recipe_gate.threshold > policy_gate.threshold


def weakening(recipe, policy: Policy, where: str) -> list[str]:
    """One line per way the run's recipe (overrides applied) would weaken the policy; empty when it does not."""
    problems = []
    if policy.require_approval and not recipe.approval.required:
        problems.append(f"approval.required: false would skip the approval the promotion policy of {where} requires "
                        f"({policy.describe()}); only `ftpipe registry policy` changes it")
    if policy.require_approval:
        for name in recipe.approval.reviewers:
            if policy.reviewer(name) is None:
                problems.append(f"approval.reviewers: {name!r} is not a reviewer in the promotion policy of {where} "
                                f"(reviewers: {', '.join(r.name for r in policy.reviewers)})")
    for i, gate in enumerate(recipe.evaluation.gates):
        for mandatory in policy.gates:
            if _looser(gate, mandatory):
                problems.append(f"evaluation.gates[{i}]: {describe_gate(gate)} is looser than the mandatory gate "
                                f"{describe_gate(mandatory)} of the promotion policy of {where}")
    champion = [g for g in policy.gates if g.reference == "champion"]
    if champion and not (recipe.registry.compare_with_champion):
        problems.append(f"registry.compare_with_champion: false would let the mandatory gate {describe_gate(champion[0])} of "
                        f"the promotion policy of {where} pass unchecked")
    return problems


def run_gates(recipe_gates: list[Gate], policy: Policy) -> list[Gate]:
    """The gates a run applies: the recipe's, then every mandatory gate it does not already list."""
    return [*recipe_gates, *(g for g in policy.gates if g not in recipe_gates)]
