"""Markdown a person reads in the Prefect UI, built from the stages' result objects."""
from __future__ import annotations

import base64
from pathlib import Path

from data_prep.prepare import PreparedData


def data_report_markdown(data: PreparedData) -> str:
    """Counts that reconcile per source, token-length percentiles and histogram, contamination."""
    rows = "\n".join(
        f"| {s.path} | {s.role} | {s.rows_in} | {s.kept} | {s.quarantined} | "
        f"{', '.join(f'{k}: {v}' for k, v in s.removed.items()) or '-'} | {s.written} | "
        f"{', '.join(f'{k}: {v}' for k, v in s.pii_redacted.items()) or '-'} | {'yes' if s.reconciles() else 'NO'} |"
        for s in data.sources
    )
    tokens = data.token_lengths or {}
    percentiles = tokens.get("train_percentiles") or {}
    token_line = ", ".join(f"{k} {v}" for k, v in percentiles.items()) or "n/a"
    removed_tokens = {split: tokens.get(split, {}) for split in ("train", "eval")}
    contamination = data.contamination or {}
    histogram = tokens.get("histogram")
    image = ""
    if histogram and Path(histogram).is_file():
        encoded = base64.b64encode(Path(histogram).read_bytes()).decode()
        image = f"\n![token length histogram](data:image/png;base64,{encoded})\n"
    return f"""# Data: {data.train_rows} train, {data.eval_rows} eval, {data.quarantined_rows} quarantined rows
{'(reused: unchanged sources and data recipe)' if data.reused else ''}

| source | role | rows in | kept | quarantined | removed | written | PII redacted | reconciles |
|---|---|---|---|---|---|---|---|---|
{rows}

Row kinds: {', '.join(f'{k}: {v}' for k, v in data.kinds.items())}. Quarantine: `{data.quarantine_path}`.

**Token lengths** (training rows, model tokenizer and chat template): {token_line}; limit {tokens.get('max_tokens')} ({tokens.get('overlong')}). Removed train/eval: too short {removed_tokens['train'].get('removed_too_short', 0)}/{removed_tokens['eval'].get('removed_too_short', 0)}, too long {removed_tokens['train'].get('removed_too_long', 0)}/{removed_tokens['eval'].get('removed_too_long', 0)}.
{image}
**Contamination** ({contamination.get('ngram', '-')}-grams, overlap >= {contamination.get('min_overlap', '-')}): {contamination.get('contaminated_train_rows', 0)} training rows overlap {contamination.get('eval_rows_hit', 0)} eval prompts; removed {contamination.get('removed', 0)}.

Fingerprint `{data.fingerprint}`
"""
