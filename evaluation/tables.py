"""Markdown of an evaluation result (EvalResult.to_dict()), shared by the approval request and the model card."""
from __future__ import annotations


def metrics_markdown(evaluation: dict) -> str:
    """The metric table of the approval request and the model card, from EvalResult.to_dict()."""
    champion = evaluation.get("champion")
    head = "| metric | base | candidate | delta vs base |" + (" champion | delta vs champion |" if champion else "")
    rule = "|---|---|---|---|" + ("---|---|" if champion else "")
    lines = [head, rule]
    for k, value in evaluation["candidate"].items():
        line = f"| {k} | {evaluation['base'][k]:.4f} | {value:.4f} | {value - evaluation['base'][k]:+.4f} |"
        if champion:
            line += f" {champion[k]:.4f} | {value - champion[k]:+.4f} |"
        lines.append(line)
    return "\n".join(lines)


def champion_line(evaluation: dict) -> str:
    info = evaluation.get("champion_info")
    if info is None:
        return "Champion: none (the registry has no production model for this name yet)."
    if not info["evaluated"]:
        return f"Champion: {info['reason']}."
    return f"Champion: production version {info['version']} of {info['model']}, evaluated on the same rows."
