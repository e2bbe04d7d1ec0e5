"""Rows built to break the data stage: each becomes one quarantine line naming its file, row and reason, the stage
goes on and its counts reconcile; PII of every detected kind stays out of what the stage writes."""
from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

import pytest

from data_prep.prepare import prepare_data, read_jsonl, redacted_section
from recipes.schema import DataSection, DataSource

GOOD = [{"messages": [{"role": "user", "content": f"question {i} about the invoice"},
                      {"role": "assistant", "content": f"answer {i}: see the billing page"}]} for i in range(40)]


def _chat(answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]})


# (line of the JSONL file, the quarantine reason it must get)
BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi\\ud800"}, {"role": "assistant", "content": "ok"}]}',
     "messages[0].content holds a lone surrogate half (not a valid code point) U+D800 at character 2"),
    ('{"text": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested too deeply to parse"),
    ('{"text": ' + "[" * 40 + '"x"' + "]" * 40 + "}", "row is nested more than data.max_nesting=32 levels deep"),
    ('{"conversations": [{"from": {"name": "human"}, "value": "hi"}, {"from": "gpt", "value": "ok"}]}',
     "conversations[0].from must be a string, got dict"),
    (_chat("\u200b\u200d\ufeff "), "messages[1].content has no visible characters (only whitespace or zero-width/format characters)"),
    (_chat("\u0000\u0000"), "messages[1].content holds the control character U+0000 at character 0"),
    (_chat("\u001b[31mred\u001b[0m"), "messages[1].content holds the control character U+001B at character 0"),
    (_chat("ding\u0007"), "messages[1].content holds the control character U+0007 at character 4"),
    ('{"conversations": [{"from": ["gpt"], "value": "hi"}]}', "conversations[0].from must be a string, got list"),
]


def _section(*paths: Path, **options) -> DataSection:
    return DataSection(sources=[DataSource(path=str(p)) for p in paths], eval_fraction=0.2, workers=1, max_invalid_fraction=0.9,
                       dedup={"near": False}, contamination={"check": False}, **options)


def test_every_hostile_row_is_one_quarantine_line_and_the_stage_goes_on(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in GOOD[:20]] + [line for line, _ in BAD_LINES] + [json.dumps(r) for r in GOOD[20:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    data = prepare_data(_section(path), tmp_path / "out")
    quarantined = read_jsonl(data.quarantine_path)
    assert [(q["source"], q["row"], q["reason"]) for q in quarantined] == [
        (str(path), 21 + i, reason) for i, (_, reason) in enumerate(BAD_LINES)]
    assert data.train_rows + data.eval_rows == 40 and data.sources[0].reconciles()
    assert data.sources[0].rows_in == 40 + len(BAD_LINES)


def test_a_json_file_with_one_item_too_deep_loses_that_item_only(tmp_path):
    path = tmp_path / "rows.json"
    items = [json.dumps(r) for r in GOOD]
    items.insert(3, '{"text": ' + "[" * 5000 + "]" * 5000 + "}")
    path.write_text("[" + ", ".join(items) + "]")
    data = prepare_data(_section(path), tmp_path / "out")
    assert [(q["row"], q["reason"]) for q in read_jsonl(data.quarantine_path)] == [(4, "JSON nested too deeply to parse")]
    assert data.train_rows + data.eval_rows == 40


def _write_csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8-sig") -> Path:
    with path.open("w", encoding=encoding, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_csv_with_a_byte_order_mark_keeps_its_rows(tmp_path, encoding):
    path = _write_csv(tmp_path / "rows.csv", [(f"q {i} é", f"a {i}") for i in range(30)], encoding)
    assert path.read_bytes().startswith(codecs.BOM_UTF8 if encoding == "utf-8-sig" else (codecs.BOM_UTF16_LE, codecs.BOM_UTF32_LE)[encoding == "utf-32"])
    data = prepare_data(_section(path), tmp_path / "out")
    assert data.quarantined_rows == 0 and data.train_rows + data.eval_rows == 30
    assert any("é" in row["messages"][0]["content"] for row in read_jsonl(data.train_path))


def test_csv_fields_beyond_the_csv_modules_limit_are_read_and_beyond_max_row_chars_quarantined(tmp_path):
    rows = [(f"q {i}", f"a {i}") for i in range(30)]
    rows[5] = ("long", "y" * 150_000)  # above csv's own 131,072, below data.max_row_chars
    rows[9] = ("longer", "z" * 300_000)  # above data.max_row_chars=200,000
    path = _write_csv(tmp_path / "rows.csv", rows, "utf-8")
    data = prepare_data(_section(path), tmp_path / "out")
    (bad,) = read_jsonl(data.quarantine_path)
    assert bad["row"] == 11 and bad["reason"].startswith("unreadable CSV row: field larger than field limit")
    assert data.train_rows + data.eval_rows == 29 and data.sources[0].reconciles()


def test_a_byte_order_mark_at_the_start_of_jsonl_and_json_is_not_a_bad_row(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + b"\n".join(json.dumps(r).encode() for r in GOOD))
    as_json = tmp_path / "rows.json"
    as_json.write_bytes(codecs.BOM_UTF8 + json.dumps(GOOD).encode())
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in GOOD), encoding="utf-16")
    for path in (jsonl, as_json, utf16):
        data = prepare_data(_section(path), tmp_path / f"out-{path.suffix}")
        assert data.quarantined_rows == 0 and data.train_rows + data.eval_rows == 40


LEAKS = {  # the values the issue found in train.jsonl, the training sample, the eval report and the artifacts
    "aws": "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "stripe": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "card": "4111.1111.1111.1111",
    "iban": "de89 3704 0044 0532 0130 00",
}
SECRET_VALUES = ["AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", LEAKS["stripe"], LEAKS["card"], LEAKS["iban"]]


def _pii_rows(tmp_path: Path) -> Path:
    rows = [json.dumps(r) for r in GOOD]
    rows += [_chat(f"use {value} for ticket {i}").replace("hello", f"question {i} {name}") for i, (name, value) in enumerate(LEAKS.items())]
    rows += ['{"messages": [{"role": "user", "content": "mine is %s"}]}' % value for value in LEAKS.values()]  # bad: no answer
    rows.append('{"conversations": [{"from": "jane.doe@example.com %s", "value": "hi"}]}' % LEAKS["card"])
    path = tmp_path / "pii.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_no_detected_kind_reaches_the_rows_the_quarantine_or_the_log(tmp_path, caplog):
    caplog.set_level("INFO", logger="data_prep.prepare")
    section = _section(_pii_rows(tmp_path), system_prompt="You are the desk of jane.doe@example.com, card 4111 1111 1111 1111")
    data = prepare_data(section, tmp_path / "out")
    written = "".join(Path(p).read_text() for p in (data.train_path, data.eval_path, data.quarantine_path, data.report_path))
    section_shown = redacted_section(section)
    written += caplog.text + json.dumps(section_shown)
    for value in [*SECRET_VALUES, "jane.doe@example.com", "4111 1111 1111 1111"]:
        assert value not in written
    assert len(read_jsonl(data.quarantine_path)) == 5 and data.quarantined_rows == 5
    assert "<SECRET>" in written and "<IBAN>" in written and "<CREDIT_CARD>" in written
    assert section_shown["system_prompt"] == "You are the desk of <EMAIL>, card <CREDIT_CARD>"
    assert sum(data.sources[0].pii_redacted.values()) >= 5


def test_quarantine_raw_keeps_the_bad_rows_as_they_came(tmp_path):
    data = prepare_data(_section(_pii_rows(tmp_path), quarantine_raw=True), tmp_path / "out")
    quarantined = Path(data.quarantine_path).read_text()
    assert LEAKS["stripe"] in quarantined and "jane.doe@example.com" in quarantined
    assert LEAKS["stripe"] not in Path(data.train_path).read_text() + Path(data.eval_path).read_text()


def test_the_manifest_and_card_show_the_data_section_redacted():
    from flows.finetune import manifest_recipe
    from recipes import recipe_hash
    from recipes.loader import recipe_from_dict

    recipe = recipe_from_dict({"data": {"system_prompt": "Escalate to jane.doe@example.com or +44 20 7946 0958"}})
    shown = manifest_recipe(recipe)
    assert shown["data"]["system_prompt"] == "Escalate to <EMAIL> or <PHONE>"
    assert "jane.doe" not in json.dumps(shown) and recipe_hash(recipe) != recipe_hash(recipe_from_dict({}))
    assert {k: v for k, v in shown.items() if k != "data"} == {k: v for k, v in recipe.model_dump(mode="json").items() if k != "data"}


def test_a_failure_no_check_foresaw_is_quarantined_with_its_exception(tmp_path, monkeypatch):
    import data_prep.rows as rows_module

    real = rows_module.to_canonical

    def fragile(record, *args):
        if "boom" in json.dumps(record):
            raise KeyError("an unforeseen bug")
        return real(record, *args)

    monkeypatch.setattr(rows_module, "to_canonical", fragile)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in GOOD] + [_chat("boom")]) + "\n")
    data = prepare_data(_section(path), tmp_path / "out")
    (bad,) = read_jsonl(data.quarantine_path)
    assert (bad["row"], bad["reason"]) == (41, "row could not be processed: KeyError: 'an unforeseen bug'")
    assert data.sources[0].reconciles() and data.train_rows + data.eval_rows == 40
