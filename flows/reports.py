"""Markdown a person reads in the Prefect UI, built from the stages' result objects."""
from __future__ import annotations

import base64
from pathlib import Path

from data_prep.prepare import PreparedData
from evaluation.monitor import EXAMPLES_PER_FLAG
from evaluation.tables import champion_line, delta_cell, metrics_markdown, metrics_of, others, pairwise_markdown
from training.train import TrainResult


def data_report_markdown(data: PreparedData) -> str:
    """Counts that reconcile per source, token-length percentiles and histogram, contamination. Two narrow tables
    (counts; what each filter removed) with sources by file name, their full paths listed below, so it fits the UI."""
    counts = "\n".join(f"| {Path(s.path).name} | {s.role} | {s.rows_in} | {s.kept} | {s.quarantined} | {s.written} | "
                       f"{'yes' if s.reconciles() else 'NO'} |" for s in data.sources)
    removals = "\n".join(f"| {Path(s.path).name} | {_counts(s.removed)} | {_counts(s.pii_redacted)} |" for s in data.sources)
    paths = "\n".join(f"- {Path(s.path).name}: `{s.path}`" for s in data.sources)
    tokens = data.token_lengths or {}
    percentiles = tokens.get("train_percentiles") or {}
    token_line = ", ".join(f"{k} {v}" for k, v in percentiles.items()) or "n/a"
    if tokens.get("train_examples"):
        token_line += (f"; {tokens['train_examples']} training examples, {tokens['train_tokens']} tokens (a template that rewrites "
                       "history makes one example per assistant turn)")
    removed_tokens = {split: tokens.get(split, {}) for split in ("train", "eval")}
    contamination = data.contamination or {}
    image = _embedded_png(tokens.get("histogram"), "token length histogram")
    return f"""# Data: {data.train_rows} train, {data.eval_rows} eval, {data.quarantined_rows} quarantined rows
{'(reused: unchanged sources and data recipe)' if data.reused else ''}

| source | role | rows in | kept | quarantined | written | reconciles |
|---|---|---|---|---|---|---|
{counts}

| source | removed by filter | PII redacted |
|---|---|---|
{removals}

Sources:
{paths}

Row kinds: {', '.join(f'{k}: {v}' for k, v in data.kinds.items())}. Quarantine: `{data.quarantine_path}`.

**Token lengths** (training rows, model tokenizer and chat template): {token_line}; limit {tokens.get('max_tokens')} ({tokens.get('overlong')}). Removed train/eval: too short {removed_tokens['train'].get('removed_too_short', 0)}/{removed_tokens['eval'].get('removed_too_short', 0)}, too long {removed_tokens['train'].get('removed_too_long', 0)}/{removed_tokens['eval'].get('removed_too_long', 0)}, not renderable by the chat template {removed_tokens['train'].get('removed_unrenderable', 0)}/{removed_tokens['eval'].get('removed_unrenderable', 0)}.
{image}
**Contamination** ({contamination.get('ngram', '-')}-grams, overlap >= {contamination.get('min_overlap', '-')}): {contamination.get('contaminated_train_rows', 0)} training rows overlap {contamination.get('eval_rows_hit', 0)} eval prompts; removed {contamination.get('removed', 0)}.

Fingerprint `{data.fingerprint}`
"""


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def number(value) -> str:
    """A measured float as a person reads it (4 significant digits), anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _embedded_png(path: str | None, alt: str) -> str:
    """A PNG inlined as a data URI: the Prefect UI shows it without serving files."""
    if not path or not Path(path).is_file():
        return ""
    return f"\n![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})\n"


def training_summary_markdown(name: str, trained: TrainResult, adapter: str, rank: int) -> str:
    """Steps, tokens, speed, memory, losses and the loss curve of a training run."""
    m = trained.metrics
    memory = m.get("peak_memory_mb") or {}
    resumed = f"resumed from step {m['resumed_at_step']}" if m.get("resumed_at_step") else "from step 0"
    distributed = m.get("distributed") or {}
    processes = (f"{distributed['num_processes']} ({distributed['strategy']}, {distributed['process_group']}, replicas differ by "
                 f"{distributed['replica_max_difference']})" if distributed.get("num_processes", 1) > 1 else "1")
    preference = m.get("preference")
    dpo_row = f"| DPO reward accuracy / margin (last logged) | {number(preference.get('reward_accuracy'))} / {number(preference.get('reward_margin'))} |\n" if preference else ""
    return f"""# Training: {name}
| | |
|---|---|
| base model | `{trained.base.model_id}` ({trained.base.model_type}) |
| backend | {m['backend']} ({m['backend_reason']}) on {m['device']} |
| method, adapter | {m.get('method', 'sft')}, {adapter} r={rank} |
| processes | {processes} |
{dpo_row}| steps / epochs | {m['steps']} / {m['epochs']} ({resumed}) |
| loss first / final / best | {number(m['first_logged_loss'])} / {number(m['final_logged_loss'])} / {number(m.get('best_logged_loss'))} |
| rows (left out as too long) | {m['train_rows']} ({m['dropped_rows']}) |
| tokens in the data, trained share | {m['train_tokens']}, {number(m['trained_token_fraction'])} |
| tokens seen, tokens/s, runtime | {m.get('tokens_seen')}, {number(m['tokens_per_s'])}, {number(m['runtime_s'])} s |
| peak memory | {memory.get('mb')} MB ({memory.get('device')}) |
| wandb | {m['wandb'] or 'disabled'} |
{_embedded_png(m.get('loss_curve_png'), 'training loss curve')}"""


EXAMPLES_SHOWN = 50  # per suite in the UI; report.json holds them all
# Characters of model text one table row shows: what fits the UI's artifact column (about 845 px of a 1400 px wide
# window) beside the example and outcome columns, shared by the text columns; the full texts are a link away.
ROW_TEXT_CHARS = 72
TABLE_TEXTS = ("reference", "base", "candidate", "champion")


def example_table(report_path: str) -> list[dict]:
    """Rows of the per-example table, narrow enough for the UI: the example (suite and number), the outcome and
    each model's output (or preference margin) beside the reference, cut to share ROW_TEXT_CHARS; the prompt and the
    full texts are in example_report_markdown under the same example name."""
    rows = _example_rows(report_path)
    texts = [key for key in TABLE_TEXTS if any(key in row for row in rows)]
    chars = ROW_TEXT_CHARS // max(len(texts), 1)
    return [{key: _cell(value, chars) for key, value in row.items() if key != "prompt"} for row in rows]


def example_report_markdown(report_path: str) -> str:
    """Every example the table shows, in full, one section each (what the table's cut cells link to)."""
    sections = [f"### {row['example']}\n" + "\n".join(f"- **{key}**: {_quoted(value)}" for key, value in row.items() if key != "example")
                for row in _example_rows(report_path)]
    return f"# Evaluation examples (first {EXAMPLES_SHOWN} of each suite; every example: `{report_path}`)\n\n" + "\n\n".join(sections)


def _example_rows(report_path: str) -> list[dict]:
    import json

    report = json.loads(Path(report_path).read_text())
    rows = []
    for name, suite in report["suites"].items():
        for number_in_suite, example in enumerate(suite["per_example"][:EXAMPLES_SHOWN], 1):
            row = {"example": f"{name} #{number_in_suite}", "outcome": example["outcome"], "prompt": example["prompt"],
                   "reference": example["reference"]}
            for who in ("base", "candidate", "champion"):
                shown = example.get(f"{who}_output", example.get(f"{who}_preference_margin"))
                if shown is not None or who != "champion":
                    row[who] = shown
            if "outcome_vs_champion" in example:
                row["vs champion"] = example["outcome_vs_champion"]
            rows.append(row)
    return rows


def _cell(value, chars: int):
    """A table cell: numbers rounded, text on one line and cut to `chars` (an ellipsis says it was cut)."""
    if isinstance(value, float):
        return round(value, 4)
    if not isinstance(value, str):
        return value
    flat = " ".join(value.split())
    return flat if len(flat) <= chars else flat[:chars - 1] + "…"


def _quoted(value) -> str:
    """Model text as inline code, so markdown in an output shows as written (backticks doubled around it)."""
    if not isinstance(value, str):
        return number(value)
    text = " ".join(value.split()) or "(empty)"
    return f"`` {text} ``"


def safety_table(report_path: str) -> list[dict]:
    """One row per red-team or bias probe: what was asked, whether each model handled it safely, the candidate's answer."""
    import json

    safety = json.loads(Path(report_path).read_text()).get("safety") or {}
    per_probe = safety.get("per_probe", [])
    verdicts = 3 if any("champion_safe" in p for p in per_probe) else 2
    chars = (ROW_TEXT_CHARS - 16 * (verdicts - 1)) // 2  # the prompt and the answer share what the verdict columns leave
    return [{"kind": p["kind"], "prompt": _cell(p["prompt"], chars), "base safe": p["base_safe"], "candidate safe": p["candidate_safe"],
             **({"champion safe": p["champion_safe"]} if "champion_safe" in p else {}),
             "candidate answer": _cell(json.dumps(p["candidate_answer"], ensure_ascii=False), chars)} for p in per_probe]


def evaluation_table(evaluation) -> list[dict]:
    """Each metric for the candidate and every model it is compared with (base, champion, contenders), with the
    candidate's delta against each and its bootstrap interval (marked when within noise)."""
    result = evaluation.to_dict()
    rows = []
    for metric, value in evaluation.candidate.items():
        row = {"metric": metric, "candidate": rounded(value)}
        for who in others(result):
            row |= {who: rounded(metrics_of(result, who).get(metric)), f"delta vs {who}": delta_cell(result, who, metric)}
        rows.append(row)
    return rows


def serving_parity_table(evaluation) -> list[dict]:
    """Each metric of the served candidate beside the in-process one, with the served-minus-in-process interval."""
    from evaluation.confidence import describe

    served = evaluation.served
    return [{"metric": key, "in-process": rounded(evaluation.candidate.get(key.removeprefix("served."))), "served": rounded(value),
             "served minus in-process": describe(served["deltas"].get(key))} for key, value in served["metrics"].items()]


def rounded(value):
    return round(value, 4) if isinstance(value, float) and value == value else "-" if value is None else value


def approval_request_markdown(recipe, governance, evaluation, decision, artifact_path: str, version) -> str:
    """What the reviewer reads before deciding: metrics side by side, safety, gates, where the report lies."""
    gates = "\n".join(f"- {'PASS' if r.passed else 'FAIL'}: {r.describe()}" for r in decision.results) or "- none configured"
    return f"""# Promotion decision needed: {recipe.name} version {version.version}
Needed: {governance.describe()} (the promotion policy of {recipe.name} in `{governance.registry_uri}`). Decide with the
**Resume** form of this flow run (reviewer name and token), or
`ftpipe approve <flow-run-id> --reviewer NAME [--reject] [--comment TEXT]` with the token in `$FTPIPE_REVIEWER_TOKEN`.
Without enough approvals within {governance.timeout_hours:g} h the model is not promoted.

{champion_line(evaluation.to_dict())}

{metrics_markdown(evaluation.to_dict())}

{pairwise_markdown(evaluation.to_dict())}

**Gates** (the recipe's and the policy's mandatory ones)
{gates}

Per-example outputs and safety probes: the `evaluation-examples` and `safety` artifacts, and `{evaluation.report_path}`.
Artifact: `{artifact_path}`; registered as {recipe.name} version {version.version} (`candidate`): `{version.url}`.
"""


def approval_form_markdown(recipe, governance, version) -> str:
    """The Resume form's description: who may decide, and where the evidence is."""
    from flows.publish import run_artifact_links

    links = run_artifact_links(("approval-request", "evaluation", "evaluation-examples", "safety", "gate-decision"))
    return (f"**{recipe.name} version {version.version}**: {governance.describe()}. Reviewers: {', '.join(governance.reviewers)}. "
            f"Give your reviewer name and the token `ftpipe registry policy` issued to you; a wrong token, another name or the "
            f"run's own submitter is refused and recorded in the audit log. Evidence: {links}.")


def approval_result_markdown(recipe, version, outcome: dict, moved: dict | None) -> str:
    """The approval-request artifact's last version: the decision, who made it, and the production move."""
    votes = "\n".join(f"- {a['decision']} by {a['reviewer']} (credential {a['credential_id']}) at {a['decided_at']}"
                      + (f": {a['comment']}" if a["comment"] else "") for a in [*outcome["approvers"], *([outcome["rejected_by"]]
                                                                                  if outcome.get("rejected_by") else [])])
    production = (f"production {moved['previous'] or '-'} -> {moved['version']}" if moved else
                  "production unchanged" + (" (this version is production already)" if outcome["outcome"] in ("approved", "not required") else ""))
    return f"""# Decision: {outcome['outcome']} ({recipe.name} version {version.version})
{votes or '- ' + (outcome.get('reason') or outcome['outcome'])}

{production}. Every answer, refusals included, is in the model's audit log (`ftpipe registry verify {recipe.name}`).
"""


SPARK = "▁▂▃▄▅▆▇█"
HISTORY_RUNS = 30


def monitoring_markdown(result: dict, history: list, report: Path) -> str:
    """A monitoring run: its verdict and breaches, what happened to production, every metric against the release, the
    history of each metric over the model's monitoring runs (the latest value in a chart), and examples of what was flagged."""
    rollback = result.get("rollback") or {}
    action = (f"production rolled back to version {rollback['to']}" if rollback.get("to")
              else f"production stays: {rollback['refused']}" if rollback.get("refused") else "production stays")
    breaches = "\n".join(f"- {b}" for b in result["breaches"]) or "- none"
    counts = result["counts"]
    examples = "\n".join(f"- {flag}: " + "; ".join(f"`{e['where']}`: {e['answer'][:120]!r}" for e in found)
                         for flag, found in result["examples"].items()) or "- none"
    chart = _history_chart(history, result)
    return f"""# {result['model']} version {result['version']}: {result['status'].upper()}

{action}. Audit log: {len(history)} monitoring run(s) of this model; the full report: `{report}`.

## Breaches
{breaches}

## Looked at
- canary: {counts['canary']} requests to {result['endpoint'] or 'no endpoint'}
- traffic: {counts['traffic_scored']} scored of {counts['traffic_records']} records ({counts['traffic_unreadable']} unreadable lines) from `{result['traffic'] or 'no traffic'}`

## Over time (oldest to latest, last {HISTORY_RUNS} runs)
| metric | history | latest | at evaluation |
|---|---|---|---|
{_history_rows(history, result)}
{chart}
## Flagged outputs (first {EXAMPLES_PER_FLAG} per flag)
{examples}
"""


def monitoring_table(result: dict) -> list[dict]:
    """One row per monitored metric: value, interval, the value at evaluation, drift, and its threshold's verdict."""
    thresholds = {t["threshold"].split(" ")[0]: t for t in result["thresholds"]}
    rows = []
    for name, measured in sorted(result["metrics"].items()):
        drift = result["drift"].get(name) or {}
        threshold = thresholds.get(name)
        rows.append({"metric": name, "value": round(measured["value"], 4),
                     "interval": f"[{measured['low']:.4g}, {measured['high']:.4g}]" if "low" in measured else "-",
                     "at evaluation": round(drift["recorded"], 4) if drift else "-",
                     "drift": ("DRIFTED" if drift.get("drifted") else "within tolerance") if drift else "-",
                     "threshold": (f"{threshold['threshold']}: {'BREACH' if threshold['breached'] else 'ok'}") if threshold else "-"})
    return rows


def _series(history: list, name: str) -> list[float]:
    return [e.data["metrics"][name]["value"] for e in history[-HISTORY_RUNS:] if name in e.data.get("metrics", {})]


def _sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    return "".join(SPARK[int((v - low) / (high - low) * (len(SPARK) - 1)) if high > low else 0] for v in values)


def _history_rows(history: list, result: dict) -> str:
    rows = []
    for name in sorted(result["metrics"]):
        values = _series(history, name)
        recorded = result["recorded"].get(name)
        rows.append(f"| {name} | {_sparkline(values) if values else '-'} | {result['metrics'][name]['value']:.4g} | "
                    f"{'-' if recorded is None else f'{recorded:.4g}'} |")
    return "\n".join(rows)


def _history_chart(history: list, result: dict) -> str:
    """The first breached metric (else the first task metric of the canary) over the runs, as a chart."""
    import tempfile

    from data_prep.charts import draw_curve

    breached = [t["threshold"].split(" ")[0] for t in result["thresholds"] if t["breached"]]
    breached += [name for name, d in result["drift"].items() if d["drifted"]]
    name = next(iter(breached), next((n for n in sorted(result["metrics"]) if n.startswith("canary.") and "rate" not in n), None))
    values = _series(history, name) if name else []
    if not values:
        return ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history.png"
        draw_curve(list(enumerate(values, start=1)), f"{name} per monitoring run", path)
        return _embedded_png(str(path), f"{name} over monitoring runs")
