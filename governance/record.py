"""A registered version's record as the audit log tells it: the model card with its decisions, for people and auditors."""
from __future__ import annotations

from serving.cards import APPROVAL_PLACEHOLDER, MONITORING_PLACEHOLDER


def version_events(registry, model: str, version: str) -> list:
    """Log entries about one version (registration, approval requests, decisions, refusals, outcomes, alias moves)."""
    return [e for e in registry.events(model) if e.data.get("version") == str(version)]


def approval_markdown(registry, model: str, version: str) -> str:
    lines = []
    for entry in version_events(registry, model, version):
        data = entry.data
        if entry.event == "register":
            lines.append(f"- {entry.at}: registered by {entry.by}")
        elif entry.event == "approval_requested":
            lines.append(f"- {entry.at}: approval requested by {data.get('run') or entry.by} from {', '.join(data['reviewers'])} "
                         f"({data['approvals']} needed; submitter {data.get('submitter') or 'unknown'})")
        elif entry.event == "decision":
            lines.append(f"- {entry.at}: {data['decision']} by {data['reviewer']} (credential {data['credential_id']})"
                         + (f": {data['comment']}" if data.get("comment") else ""))
        elif entry.event == "decision_refused":
            lines.append(f"- {entry.at}: refused an answer claiming to be {data['claimed_reviewer']!r}: {data['reason']}")
        elif entry.event == "approval":
            lines.append(f"- {entry.at}: outcome **{data['outcome']}** ({data.get('run') or entry.by})")
        elif entry.event == "monitoring" and entry.data.get("breaches"):
            lines.append(f"- {entry.at}: monitoring breach ({entry.by}): " + "; ".join(entry.data["breaches"][:3]))
        elif entry.event == "alias":
            lines.append(f"- {entry.at}: {data['alias']} {data['previous'] or '-'} -> {data['version']} by {entry.by}"
                         + (f" ({data['reason']})" if data.get("reason") else ""))
    events = registry.events(model)
    aliases = sorted(a for a, v in registry.aliases(model).items() if v == str(version))
    lines.append(f"\nNow: {', '.join(aliases) or 'no alias'}. From `{registry.uri}/{model}/audit.jsonl`, {len(events)} entries, "
                 f"head {events[-1].hash if events else '-'} (`ftpipe registry verify {model} --head HASH` checks it later).")
    return "\n".join(lines)


def monitoring_markdown(registry, model: str, version: str) -> str:
    """The version's monitoring history: runs, breaches, rollbacks, and the latest values of what breached."""
    runs = [e for e in version_events(registry, model, version) if e.event == "monitoring"]
    if not runs:
        return "Monitoring history: no monitoring run has checked this version yet."
    breached = [e for e in runs if e.data["status"] == "breach"]
    rollbacks = [e for e in registry.events(model) if e.event == "alias" and e.data.get("previous") == str(version)
                 and e.data.get("rollback") and str(e.data.get("reason", "")).startswith("monitoring")]
    lines = [f"Monitoring history: {len(runs)} run(s) from {runs[0].at} to {runs[-1].at}; {len(breached)} with a breach; "
             f"{len(rollbacks)} rollback(s).", "", "| at | status | canary rows | traffic scored | breaches |", "|---|---|---|---|---|"]
    for entry in runs[-20:]:
        counts = entry.data["counts"]
        lines.append(f"| {entry.at} | {entry.data['status']} | {counts['canary']} | {counts['traffic_scored']} | "
                     + ("; ".join(entry.data["breaches"][:2]).replace("|", "/") or "-") + " |")
    lines += [f"\nRolled back {e.at} by {e.by}: production {e.data['previous']} -> {e.data['version']} ({e.data['reason']})" for e in rollbacks]
    return "\n".join(lines)


def render_card(registry, model: str, version: str) -> str:
    """The version's README.md with its approval and monitoring sections filled from the verified audit log."""
    found = registry.version(model, version)
    problems = registry.version_problems(found)
    card = registry.fs.cat_file(f"{found.url}/README.md").decode()
    record = approval_markdown(registry, model, version)
    if problems:
        record = "**Files changed since registration:** " + "; ".join(problems) + "\n\n" + record
    monitoring = monitoring_markdown(registry, model, version)
    card = card.replace(MONITORING_PLACEHOLDER, monitoring) if MONITORING_PLACEHOLDER in card else f"{card}\n## Monitoring\n{monitoring}\n"
    return card.replace(APPROVAL_PLACEHOLDER, record) if APPROVAL_PLACEHOLDER in card else f"{card}\n## Audit record\n{record}\n"
