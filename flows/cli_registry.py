"""`ftpipe registry ...` and `ftpipe approve`: versions and aliases, the promotion policy, verification, the card."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED_CHECK, EXIT_INPUT = 0, 1, 2
TOKEN_ENV = "FTPIPE_REVIEWER_TOKEN"


def add_commands(sub) -> None:
    approve = sub.add_parser("approve", help="approve (or --reject) the promotion a paused finetune run waits for, through the Prefect API")
    approve.add_argument("flow_run_id", help="the paused flow run's id (Prefect UI, or `prefect flow-run ls --state Paused`)")
    approve.add_argument("--reviewer", required=True, help="your reviewer name in the model's promotion policy")
    approve.add_argument("--token-file", help=f"a file holding your reviewer token (default: ${TOKEN_ENV}, else asked for)")
    approve.add_argument("--reject", action="store_true", help="reject: the model is not promoted")
    approve.add_argument("--comment", default="", help="why; kept in the model's audit log")
    approve.set_defaults(handler=_approve)

    registry = sub.add_parser("registry", help="versions, aliases and policy of registered models; promote, roll back, verify")
    commands = registry.add_subparsers(dest="registry_command", required=True)
    specs = (
        ("list", "versions, aliases and the history of alias moves", _list),
        ("promote", "move production to an approved version", _promote),
        ("rollback", "move production back to the version it held before (or --to one that was in production)", _rollback),
        ("policy", "show or change the model's promotion policy (reviewers, approvals, mandatory gates)", _policy),
        ("verify", "check the audit log's hash chain and every version's files; exit 1 naming each problem", _verify),
        ("card", "a version's model card with its decisions from the audit log", _card),
        ("log", "every audit log entry, one a line: registrations, decisions, alias moves, monitoring runs, release checks", _log),
    )
    for name, help_text, handler in specs:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("model", nargs="?" if name == "verify" else None, help="the model's name (the recipe's name)")
        command.add_argument("--registry", default=str(Path("runs") / "registry"),
                             help="folder or fsspec URL of the registry (default: runs/registry, where `ftpipe run` registers)")
        command.set_defaults(handler=handler)
        if name in ("promote", "rollback"):
            command.add_argument("--to", required=name == "promote", help="the version number")
            command.add_argument("--reason", default="", help="why; kept in the audit log with your login")
        if name == "card":
            command.add_argument("version", help="the version number")
        if name == "verify":
            command.add_argument("--head", help="an entry hash noted earlier: the log must still hold it (a rewritten log does not)")
        if name == "policy":
            _policy_args(command)


def _policy_args(command: argparse.ArgumentParser) -> None:
    approval = command.add_mutually_exclusive_group()
    approval.add_argument("--require-approval", dest="require_approval", action="store_true", default=None,
                          help="promotion needs reviewers' approval")
    approval.add_argument("--no-require-approval", dest="require_approval", action="store_false", help="it does not")
    command.add_argument("--reviewer", dest="reviewers", action="append", metavar="NAME",
                         help="the reviewers (repeat; replaces the list): new ones get a token, printed once")
    command.add_argument("--login", dest="logins", action="append", default=[], metavar="NAME=LOGIN",
                         help="a reviewer's login, so they cannot approve runs they started themselves (default: their name)")
    command.add_argument("--new-token", dest="new_tokens", action="append", default=[], metavar="NAME",
                         help="issue a new token to this reviewer (the old one stops working)")
    command.add_argument("--approvals", type=int, help="approvals needed from different reviewers (default 1)")
    command.add_argument("--gate", dest="gates", action="append", metavar="GATE",
                         help="a mandatory gate (repeat; replaces the list): 'exact_match>=0.9', 'safety.pii_leak_rate<=0', "
                         "or a mapping '{metric: safety.refusal_rate, no_regression_vs: base, tolerance: 0.02}'")
    command.add_argument("--no-gates", action="store_true", help="remove every mandatory gate")
    command.add_argument("--monitor-threshold", dest="monitor_thresholds", action="append", metavar="THRESHOLD",
                         help="a mandatory monitoring threshold (repeat; replaces the list): 'traffic.pii_leak_rate<=0', "
                         "'canary.exact_match>=0.9'; every monitoring run applies it on top of the version's own")
    command.add_argument("--no-monitor-thresholds", action="store_true", help="remove every mandatory monitoring threshold")
    rollback = command.add_mutually_exclusive_group()
    rollback.add_argument("--rollback-on-breach", dest="rollback_on_breach", action="store_true", default=None,
                          help="a monitoring breach of the production version moves production back to the previous one")
    rollback.add_argument("--no-rollback-on-breach", dest="rollback_on_breach", action="store_false",
                          help="a breach alerts and is recorded; production stays")
    command.add_argument("--reason", default="", help="why; kept in the audit log")


def _registry(args):
    from serving.registry import Registry

    return Registry(args.registry)


def refused(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_INPUT


def registry_errors():
    """What the command line reports as a refused input (exit 2), one line, no traceback."""
    from evaluation.monitor import MonitoringError
    from governance.audit import AuditError
    from serving.registry import RegistryError

    return RegistryError, AuditError, MonitoringError


def _list(args) -> int:
    registry = _registry(args)
    versions = registry.versions(args.model)
    if not versions:
        print(f"error: {args.model} has no versions in {registry.uri} (models there: {', '.join(registry.models()) or 'none'})", file=sys.stderr)
        return EXIT_INPUT
    by_version: dict[str, list[str]] = {}
    for alias, version in registry.aliases(args.model).items():
        by_version.setdefault(version, []).append(alias)
    print(f"{args.model} in {registry.uri} ({registry.policy(args.model).describe()})")
    print(f"{'version':>7}  {'aliases':<20}  {'registered':<20}  {'approval':<28}  exact_match")
    for version in versions:
        outcome = registry.approval_outcome(args.model, version.version) or {"outcome": "pending", "approvers": []}
        approvers = ",".join(a["reviewer"] for a in outcome["approvers"])
        decision = outcome["outcome"] + (f" by {approvers}" if approvers else "")
        metric = (registry.manifest(version).get("evaluation") or {}).get("candidate", {}).get("exact_match")
        print(f"{version.version:>7}  {','.join(sorted(by_version.get(version.version, []))) or '-':<20}  "
              f"{version.record['registered_at']:<20}  {decision[:28]:<28}  {'-' if metric is None else f'{metric:.4f}'}")
    print("history:")
    for move in registry.history(args.model):
        print(f"  {move['at']}  {move['alias']}: {move['previous'] or '-'} -> {move['version']}  by {move['by']}"
              + (f"  ({move['reason']})" if move["reason"] else ""))
    for leftover in registry.incomplete(args.model):
        print(f"ignored: {leftover} (an interrupted copy; not a version, safe to delete)")
    return EXIT_OK


def _promote(args) -> int:
    return _move_production(args, lambda registry, by: registry.promote(args.model, args.to, by, args.reason))


def _rollback(args) -> int:
    return _move_production(args, lambda registry, by: registry.rollback(args.model, by, args.to, args.reason))


def _move_production(args, move) -> int:
    from governance.runs import local_login

    done = move(_registry(args), local_login())
    if done is None:
        print(f"{args.model}: version {args.to} is production already; nothing moved")
    else:
        print(f"{args.model}: production {done['previous'] or '-'} -> {done['version']} by {done['by']}")
    return EXIT_OK


def _policy(args) -> int:
    from governance.policy import parse_gate, parse_threshold, with_changes
    from governance.runs import local_login

    registry = _registry(args)
    current = registry.policy(args.model)
    changes = (args.require_approval is not None or args.reviewers is not None or args.approvals is not None or args.gates
               or args.no_gates or args.new_tokens or args.logins or args.rollback_on_breach is not None or args.monitor_thresholds
               or args.no_monitor_thresholds)
    if not changes:
        print(f"{args.model} in {registry.uri}: {current.describe()}")
        for reviewer in current.reviewers:
            print(f"  reviewer {reviewer.name} (credential {reviewer.credential_id}, login {reviewer.login or reviewer.name})")
        return EXIT_OK
    if bad := [item for item in args.logins if "=" not in item]:
        return refused(ValueError(f"--login {bad[0]!r}: write NAME=LOGIN"))
    try:
        gates = [] if args.no_gates else ([parse_gate(g) for g in args.gates] if args.gates else None)
        thresholds = [] if args.no_monitor_thresholds else ([parse_threshold(t) for t in args.monitor_thresholds]
                                                            if args.monitor_thresholds else None)
        policy, issued = with_changes(current, require_approval=args.require_approval, approvals=args.approvals,
                                      reviewers=args.reviewers, new_tokens=args.new_tokens, gates=gates,
                                      logins=dict(item.split("=", 1) for item in args.logins),
                                      rollback_on_breach=args.rollback_on_breach, monitor_thresholds=thresholds)
    except ValueError as exc:
        return refused(exc)
    entry = registry.set_policy(args.model, policy, by=local_login(), reason=args.reason)
    print(f"{args.model} in {registry.uri}: {policy.describe()} (audit entry {entry.seq}, {entry.hash[:16]})")
    for name, token in issued.items():
        reviewer = policy.reviewer(name)
        print(f"token for {name} (credential {reviewer.credential_id}): {token}")
    if issued:
        print("give each token to its reviewer only; it is not shown again (only its SHA-256 is kept)", file=sys.stderr)
    return EXIT_OK


def _verify(args) -> int:
    registry = _registry(args)
    models = [args.model] if args.model else registry.models()
    if not models:
        print(f"error: no models in {registry.uri}", file=sys.stderr)
        return EXIT_INPUT
    problems: list[str] = []
    for model in models:
        found = registry.verify(model)
        if not found and args.head and not any(e.hash == args.head for e in registry.events(model)):
            found = [f"{model}: the audit log no longer holds entry {args.head} (rewritten or replaced)"]
        problems += found
        if not found:
            events = registry.events(model)
            print(f"{model}: OK ({len(events)} audit entries, {len(registry.versions(model))} versions; head {events[-1].hash})")
    for problem in problems:
        print(f"FAIL {problem}")
    return EXIT_FAILED_CHECK if problems else EXIT_OK


def _log(args) -> int:
    """The verified audit log as lines: seq, time, event, who, and what it says."""
    for entry in _registry(args).events(args.model):
        data = entry.data
        said = {"monitoring": lambda: f"version {data['version']} {data['status']}" + "".join(f"; {b}" for b in data["breaches"])
                + (f"; rollback to {data['rollback']['to']}" if data.get("rollback", {}).get("to") else ""),
                "alias": lambda: f"{data['alias']} {data['previous'] or '-'} -> {data['version']}" + (f" ({data['reason']})" if data.get("reason") else ""),
                "release_check": lambda: f"{', '.join(data['checked'])}: {'review opened' if data['review'] else 'no review'}: {data['why']}",
                }.get(entry.event, lambda: json.dumps(data, sort_keys=True)[:200])()
        print(f"{entry.seq:>4} {entry.at} {entry.event:<18} {entry.by}: {said}")
    return EXIT_OK


def _card(args) -> int:
    from governance.record import render_card

    print(render_card(_registry(args), args.model, args.version))
    return EXIT_OK


def _approve(args) -> int:
    """Resume the paused run with the reviewer's decision and token, and report whether the run accepted it."""
    from uuid import UUID

    from flows.approval import PromotionDecision, read_paused_run, resume_with_decision

    try:
        run_id = UUID(args.flow_run_id)
    except ValueError:
        return refused(ValueError(f"{args.flow_run_id!r} is not a flow run id"))
    token = _token(args)
    if not token:
        return refused(ValueError(f"no reviewer token: set ${TOKEN_ENV}, give --token-file, or run it in a terminal to be asked"))
    run, problem = read_paused_run(run_id)
    if problem:
        return refused(ValueError(problem))
    decision = PromotionDecision(decision="reject" if args.reject else "approve", reviewer=args.reviewer, token=token, comment=args.comment)
    outcome = resume_with_decision(run, decision)
    if not outcome["accepted"]:
        return refused(ValueError(f"the run refused the decision: {outcome['reason']}"))
    print(f"flow run {run_id}: {decision.decision.value} by {args.reviewer} accepted ({outcome['outcome']}); recorded in the audit log")
    return EXIT_OK


def _token(args) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("reviewer token: ").strip()
    return ""
