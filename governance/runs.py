"""What the registry's policy means for one run: refused before any work when the run would weaken it, the gates it
applies, who may decide its promotion, and the audit entries its decisions leave. Plain functions: flows/ calls them."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from governance.policy import Policy, Reviewer, authenticate, run_gates, weakening
from recipes.loader import RecipeError
from recipes.schema import Gate


@dataclass(frozen=True)
class RunGovernance:
    """The policy as it applies to one run: read once from the registry when the run starts."""

    model: str
    registry_uri: str
    policy: Policy
    approval_required: bool
    reviewers: list[str]  # who may decide this run (the policy's, narrowed by the recipe's approval.reviewers)
    approvals: int
    timeout_hours: float
    gates: list[Gate] = field(default_factory=list)

    def authenticate(self, reviewer: str, token: str, submitter: str | None) -> tuple[Reviewer | None, str]:
        """Against the policy as it is now, not as the run found it: a token revoked while the run waited no longer counts."""
        from serving.registry import Registry

        return authenticate(Registry(self.registry_uri).policy(self.model), reviewer, token, self.reviewers, submitter)

    def describe(self) -> str:
        if not self.approval_required:
            return "no approval required"
        return f"{self.approvals} approval(s) from {', '.join(self.reviewers)} within {self.timeout_hours:g} h"


def govern(recipe, registry) -> RunGovernance:
    """The run's governance under the model's policy in `registry` (None: registry disabled, nothing is promoted).
    RecipeError, one line per problem, when the run would weaken the policy or could never be approved."""
    policy = registry.policy(recipe.name) if registry is not None else Policy()
    where = f"model {recipe.name!r} in {registry.uri}" if registry is not None else f"model {recipe.name!r}"
    problems = weakening(recipe, policy, where)
    required = recipe.approval.required or policy.require_approval
    reviewers = [r.name for r in policy.reviewers if not recipe.approval.reviewers or r.name in recipe.approval.reviewers]
    approvals = policy.approvals if policy.require_approval else 1
    if required and not problems and len(reviewers) < approvals:
        problems.append(f"approval.required: no reviewer of {where} has a credential"
                        + (f" among {', '.join(recipe.approval.reviewers)}" if recipe.approval.reviewers else "")
                        + f" ({approvals} approval(s) needed); an administrator issues them with "
                        f"`ftpipe registry policy {recipe.name} --require-approval --reviewer NAME"
                        + (f" --registry {registry.uri}`" if registry is not None else "`"))
    if problems:
        raise RecipeError(problems)
    return RunGovernance(model=recipe.name, registry_uri=registry.uri if registry is not None else "", policy=policy,
                         approval_required=required, reviewers=reviewers, approvals=approvals,
                         timeout_hours=recipe.approval.timeout_hours, gates=run_gates(recipe.evaluation.gates, policy))


def local_login() -> str:
    """The login of the process's real user id (not $USER, which anyone sets)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
