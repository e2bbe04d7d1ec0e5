"""Token-length filtering with the model's own tokenizer and chat template, and the length statistics.

It runs after the model is known (a tiny model's tokenizer is trained on the prepared text) and writes the
filtered splits, their report, the over-long rows and the length histogram to a folder of their own beside the
prepared data, one per tokenizer and limits: runs of other models that share the cached prepared data (a model
comparison, concurrent runs) never read another model's filtering. Over-long rows are dropped or kept for
truncation, as the recipe says, and always counted and listed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from data_prep.charts import draw_histogram
from data_prep.files import atomic_write_text
from data_prep.prepare import PreparedData, files_fingerprint, write_report
from recipes.schema import DataSection

log = logging.getLogger(__name__)
BATCH = 256


def example_lengths(tokenizer, row: dict) -> list[int]:
    """Tokens of each training example a canonical row becomes (chat template applied to conversations; a template
    that rewrites history makes one example per assistant turn; a preference row's chosen and rejected sequences)."""
    from training.tokenize import encode_chat, encode_conversation, ids_of

    if "text" in row:
        return [len(ids_of(tokenizer, row["text"]))]
    if "messages" in row:
        return [len(e.input_ids) for e in encode_conversation(tokenizer, row["messages"])]
    return [len(encode_chat(tokenizer, row["prompt"] + row[k]).input_ids) for k in ("chosen", "rejected")]


def token_length(tokenizer, row: dict) -> int:
    """Tokens of the longest sequence the model sees for a canonical row: what max_tokens limits."""
    return max(example_lengths(tokenizer, row))


def token_lengths(tokenizer, rows: list[dict]) -> list[list[int] | str]:
    """Each row's example_lengths, or why the chat template cannot render it (a reason, never a crash of the stage)."""
    from jinja2 import TemplateError

    from training.tokenize import MaskingError

    out: list[list[int] | str] = []
    for row in rows:
        try:
            out.append(example_lengths(tokenizer, row))
        except (MaskingError, TemplateError) as exc:
            out.append(f"the chat template cannot render this row: {exc}")
    return out


def filter_token_lengths(data: PreparedData, section: DataSection, tokenizer, max_tokens: int, tokenizer_id: str) -> PreparedData:
    """Remove rows under min_tokens; drop (or keep for truncation) rows over max_tokens; record the lengths.
    Filtering the same data with the same tokenizer and limits again is a no-op."""
    key = f"{data.cache_key}|{tokenizer_id}|{section.min_tokens}|{max_tokens}|{section.overlong}|4"
    if data.token_lengths.get("key") == key:
        return data
    out_dir = Path(data.train_path).parent / f"for-model-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    out_dir.mkdir(exist_ok=True)
    stats: dict = {"key": key, "min_tokens": section.min_tokens, "max_tokens": max_tokens, "overlong": section.overlong}
    too_long: list[dict] = []
    lengths: list[int] = []
    examples: list[int] = []  # every training example's length (several per row where the template rewrites history)
    for split, path in (("train", Path(data.train_path)), ("eval", Path(data.eval_path))):
        kept, short, long_, truncated, unrenderable = _filter_file(path, out_dir / path.name, tokenizer, section, max_tokens, split,
                                                                   too_long, (lengths, examples) if split == "train" else None)
        stats[split] = {"kept": kept, "removed_too_short": short, "removed_too_long": long_, "kept_over_max_for_truncation": truncated,
                        "removed_unrenderable": unrenderable}
    atomic_write_text(out_dir / "too_long.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in too_long))
    stats["train_percentiles"] = percentiles(lengths)
    stats["train_tokens"] = sum(examples)
    stats["train_examples"] = len(examples)
    stats["histogram"] = str(out_dir / "token_lengths.png") if lengths else None
    if lengths:
        draw_histogram(lengths, max_tokens, out_dir / "token_lengths.png")
    train, held_out = out_dir / Path(data.train_path).name, out_dir / Path(data.eval_path).name
    filtered = replace(data, train_path=str(train), eval_path=str(held_out), report_path=str(out_dir / "report.json"),
                       train_rows=stats["train"]["kept"], eval_rows=stats["eval"]["kept"], token_lengths=stats,
                       fingerprint=files_fingerprint(section, train, held_out))
    write_report(filtered)
    log.info("data: token lengths p50/p90/p99/max %s; removed %s too short, %s too long",
             stats["train_percentiles"], stats["train"]["removed_too_short"] + stats["eval"]["removed_too_short"],
             stats["train"]["removed_too_long"] + stats["eval"]["removed_too_long"])
    return filtered


def _filter_file(path: Path, target: Path, tokenizer, section: DataSection, max_tokens: int, split: str, too_long: list,
                 lengths: tuple[list, list] | None):
    """Filter one split; `lengths` collects (each kept row's longest sequence, each kept example's length)."""
    kept = short = long_ = truncated = unrenderable = 0
    handle, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".filtering")  # a name of its own per writer
    with path.open(encoding="utf-8") as src, os.fdopen(handle, "w", encoding="utf-8") as dst:
        number = 0
        while batch := [line for _, line in zip(range(BATCH), src)]:
            rows = [json.loads(line) for line in batch]
            for line, measured in zip(batch, token_lengths(tokenizer, rows), strict=True):
                number += 1
                if isinstance(measured, str):
                    unrenderable += 1
                    too_long.append({"split": split, "row": number, "reason": measured})
                    continue
                n = max(measured)
                if n < section.min_tokens:
                    short += 1
                    continue
                if n > max_tokens:
                    if section.overlong == "drop":
                        long_ += 1
                        too_long.append({"split": split, "row": number, "tokens": n, "reason": f"longer than max_tokens={max_tokens}"})
                        continue
                    truncated += 1
                kept += 1
                if lengths is not None:
                    lengths[0].append(n)
                    lengths[1].extend(measured)
                dst.write(line)
    os.replace(staged, target)
    return kept, short, long_, truncated, unrenderable


def percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1)}


