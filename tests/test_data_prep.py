"""Data stage: formats, validation, quarantine, bad files, split and fingerprint."""
from __future__ import annotations

import csv
import json

import pytest

from data_prep.formats import RowError, to_messages
from data_prep.prepare import prepare_data, read_jsonl, split_rows
from data_prep.readers import DataError
from recipes.schema import DataSection, DataSource
from tests.conftest import SAMPLE_TRAIN, read_rows, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def section_for(*paths, **kwargs) -> DataSection:
    return DataSection(sources=[DataSource(path=str(p)) for p in paths], **kwargs)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (CHAT, CHAT["messages"]),
        ({"instruction": "Add", "input": "1+1", "output": "2"}, [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]),
        ({"instruction": "Say hi", "output": "hi"}, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
        ({"prompt": "2+2=", "completion": "4"}, [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]),
    ],
)
def test_formats_normalise_to_chat(record, expected):
    assert to_messages(record, "auto") == expected


def test_system_prompt_is_added_when_missing():
    assert to_messages(CHAT, "auto", system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_unicode_is_nfc_normalised():
    decomposed = {"prompt": "Cafe\u0301", "completion": "ok"}
    assert to_messages(decomposed, "auto")[0]["content"] == "Caf\u00e9"


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ([1, 2], "auto", "row is a list, expected an object"),
        ({"text": "x"}, "auto", "unrecognised row format (keys: text); expected messages, instruction/output or prompt/completion"),
        ({"messages": []}, "auto", "messages must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "auto", "messages[0] must be an object with exactly role and content"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "auto", "messages[0].content must be a string, got int"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "auto", "messages[0].content is empty"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "auto", "messages[0].role 'bot' is not one of system, user, assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "auto", "messages[0].role is 'assistant', expected 'user' (turns must alternate user/assistant)"),
        ({"messages": [{"role": "user", "content": "a"}]}, "auto", "the last message must be from the assistant"),
        ({"messages": [{"role": "system", "content": "s"}]}, "auto", "no user/assistant turns"),
        ({"prompt": "a", "completion": "b"}, "alpaca", "row looks like completion but the source says format: alpaca"),
        ({"prompt": "a", "completion": None}, "auto", "completion must be a string, got NoneType"),
    ],
)
def test_bad_rows_give_the_quarantine_reason(record, fmt, reason):
    with pytest.raises(RowError) as info:
        to_messages(record, fmt)
    assert str(info.value) == reason


def test_bad_rows_are_quarantined_with_file_row_and_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(chat(i)) for i in range(40)]
    lines = good[:10] + ['{"messages": [oops'] + good[10:] + ['{"prompt": "p"}']
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "completion": "x"}\n')
    data = prepare_data(section_for(path, max_invalid_fraction=0.1), tmp_path / "out")
    quarantined = read_jsonl(data.quarantine_path)
    assert [(q["row"], q["reason"]) for q in quarantined] == [
        (11, "invalid JSON: Expecting value at column 15"),
        (42, "unrecognised row format (keys: prompt); expected messages, instruction/output or prompt/completion"),
        (43, "not valid UTF-8 (invalid start byte at byte 12)"),
    ]
    assert all(q["source"] == str(path) for q in quarantined)
    assert data.sources[0].rows_in == 43 and data.sources[0].kept == 40 and data.sources[0].quarantined == 3
    assert data.train_rows + data.eval_rows == 40


def test_too_many_invalid_rows_fail_the_stage(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(i) for i in range(9)] + [{"text": "x"}])
    with pytest.raises(DataError) as info:
        prepare_data(section_for(path), tmp_path / "out")
    assert str(info.value) == (
        f"1 of 10 rows (10.0%) are invalid, above data.max_invalid_fraction=0.05; worst source {path} (1/10); "
        f"reasons in {tmp_path / 'out' / 'quarantine.jsonl'}"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "file not found"),
        ("empty.jsonl", b"", "file is empty"),
        ("blank.jsonl", b"\n\n", "file has no rows"),
        ("data.txt", b"x", "unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"),
        ("bad.json", b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ("scalar.json", b"3", "a JSON file must hold an object or a list of objects, got int"),
        ("latin1.csv", "prompt,completion\ncaf\xe9,x\n".encode("latin-1"), "not valid UTF-8 (invalid continuation byte at byte 21)"),
        ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare_data(section_for(path), tmp_path / "out")
    assert str(info.value).startswith(f"{path}: {message}")


def test_csv_json_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    data = prepare_data(section_for(tmp_path / "d.csv", tmp_path / "d.json", tmp_path / "d.parquet"), tmp_path / "out")
    assert [s.kept for s in data.sources] == [30, 30, 30]
    assert data.sources[0].formats == {"completion": 30}


def test_csv_row_with_missing_columns_is_quarantined(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(30)) + "only-one-column\n")
    data = prepare_data(section_for(path), tmp_path / "out")
    assert [(q["row"], q["reason"]) for q in read_jsonl(data.quarantine_path)] == [(32, "expected 2 columns (prompt, completion)")]


def test_split_is_deterministic_and_independent_of_row_order():
    rows = read_rows(SAMPLE_TRAIN, 500)
    train, held = split_rows(rows, 0.1, seed=3)
    train2, held2 = split_rows(list(reversed(rows)), 0.1, seed=3)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, held)) == sorted(map(key, held2))
    assert 25 <= len(held) <= 80 and len(train) + len(held) == 500
    assert split_rows(rows, 0.1, seed=4)[1] != held


def test_fingerprint_is_stable_and_tracks_content(tmp_path):
    rows = read_rows(SAMPLE_TRAIN, 100)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    first = prepare_data(section_for(path), tmp_path / "o1").fingerprint
    assert prepare_data(section_for(path), tmp_path / "o2").fingerprint == first
    rows[0]["messages"][-1]["content"] = "changed"
    write_jsonl(path, rows)
    assert prepare_data(section_for(path), tmp_path / "o3").fingerprint != first


def test_outputs_and_report(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", read_rows(SAMPLE_TRAIN, 200))
    data = prepare_data(section_for(path), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fingerprint"] == data.fingerprint
    assert report["train_rows"] == len(read_jsonl(data.train_path)) and report["eval_rows"] == len(read_jsonl(data.eval_path))
    assert report["train_rows"] + report["eval_rows"] == 200
