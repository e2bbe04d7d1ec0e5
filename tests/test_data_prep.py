"""Data stage: formats, validation, quarantine, cleaning, PII, dedup, sources, split, contamination, bad input."""
from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from data_prep.formats import RowError, normalise_text, to_canonical
from data_prep.pii import Redactor
from data_prep.prepare import prepare_data, read_jsonl, split_rows
from data_prep.readers import DataError
from recipes.schema import DataSection, DataSource
from tests.conftest import SAMPLE_TRAIN, read_rows, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
NO_DEDUP = {"dedup": {"exact": False, "near": False}, "contamination": {"check": False}}


def prose(i: int, words: int = 30) -> str:
    """Deterministic text of random words, different for each i."""
    import random

    rng = random.Random(i)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "su", "ti") for b in ("bo", "da", "fe", "gu", "hi", "jo", "ke", "lu")]


def chat(i: int, text: str = "question") -> dict:
    return {"messages": [{"role": "user", "content": f"{text} number {i} about topic {i * 7919 % 1000}"},
                         {"role": "assistant", "content": f"answer {i} is {i * 31 % 97}"}]}


def section_for(*paths, workers: int = 1, **kwargs) -> DataSection:
    return DataSection(sources=[DataSource(path=str(p)) for p in paths], workers=workers, **kwargs)


def user_assistant(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        (CHAT, "chat", CHAT),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "sharegpt", CHAT),
        ({"instruction": "Add", "input": "1+1", "output": "2"}, "alpaca", {"messages": user_assistant("Add\n\n1+1", "2")}),
        ({"instruction": "Say hi", "output": "hi"}, "alpaca", {"messages": user_assistant("Say hi", "hi")}),
        ({"prompt": "2+2=", "completion": "4"}, "completion", {"messages": user_assistant("2+2=", "4")}),
        ({"text": "Some  domain   text.\r\n\r\n\r\nMore."}, "text", {"text": "Some domain text.\n\nMore."}),
        ({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "preference",
         {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "good"}],
          "rejected": [{"role": "assistant", "content": "bad"}]}),
    ],
)
def test_every_format_becomes_a_canonical_row_and_auto_detects_it(record, fmt, expected):
    assert to_canonical(record, "auto") == (fmt, expected)
    assert to_canonical(record, fmt) == (fmt, expected)


def test_system_prompt_add_and_replace():
    with_system = {"messages": [{"role": "system", "content": "Old."}, *CHAT["messages"]]}
    assert to_canonical(CHAT, "auto", "Be brief.")[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert to_canonical(with_system, "auto", "Be brief.", "add")[1]["messages"][0]["content"] == "Old."
    assert to_canonical(with_system, "auto", "Be brief.", "replace")[1]["messages"][0]["content"] == "Be brief."


def test_text_is_nfc_and_whitespace_normalised():
    assert normalise_text("  Cafe\u0301 \t costs\u00a0 3   euros  \n\n\n\nok ") == "Caf\u00e9 costs 3 euros\n\nok"


@pytest.mark.parametrize(
    ("record", "fmt", "reason"),
    [
        ([1, 2], "auto", "row is a list, expected an object"),
        ({"foo": "x"}, "auto", "unrecognised row format (keys: foo); expected messages, conversations, instruction/output, "
                               "prompt/completion, prompt/chosen/rejected or text"),
        ({"messages": []}, "auto", "messages must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "auto", "messages[0] must be an object with role and content"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "auto", "messages[0].content must be a string, got int"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "auto", "messages[0].content is empty"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "auto", "messages[0].role 'bot' is not one of system, user, assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "auto", "messages[0].role is 'assistant', expected 'user' (turns must alternate user/assistant)"),
        ({"messages": [{"role": "user", "content": "a"}]}, "auto", "the last message must be from the assistant"),
        ({"messages": [{"role": "system", "content": "s"}]}, "auto", "no user/assistant turns"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "auto", "conversations[0].from 'alien' is not one of human, user, gpt, assistant, chatgpt, model, bot, system"),
        ({"prompt": "a", "completion": "b"}, "alpaca", "row looks like completion but the source says format: alpaca"),
        ({"prompt": "a", "completion": None}, "auto", "completion must be a string, got NoneType"),
        ({"chosen": "a", "rejected": "b"}, "auto", "preference row has chosen/rejected but no prompt"),
        ({"text": "   "}, "auto", "text is empty"),
    ],
)
def test_bad_rows_give_the_quarantine_reason(record, fmt, reason):
    with pytest.raises(RowError) as info:
        to_canonical(record, fmt)
    assert str(info.value) == reason


PII_CASES = [
    ("write to jane.doe@example.com today", "write to <EMAIL> today", "email"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
    ("or (555) 123-4567", "or <PHONE>", "phone"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("iban GB82 WEST 1234 5698 7654 32", "iban <IBAN>", "iban"),
    ("iban DE89370400440532013000.", "iban <IBAN>.", "iban"),
    ("host 192.168.1.10 down", "host <IP_ADDRESS> down", "ip_address"),
    ("v6 2001:db8::1 down", "v6 <IP_ADDRESS> down", "ip_address"),
    ("key AKIAIOSFODNN7EXAMPLE", "key <SECRET>", "secret"),
    ("tok ghp_abcdefghijklmnopqrstuvwxyz0123456789", "tok <SECRET>", "secret"),
    ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz123456", "Authorization: <SECRET>", "secret"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "<SECRET>", "secret"),
]


@pytest.mark.parametrize(("text", "redacted", "kind"), PII_CASES)
def test_pii_is_redacted_with_typed_placeholders(text, redacted, kind):
    counts = Counter()
    assert Redactor(["email", "phone", "credit_card", "iban", "ip_address", "secret"]).redact(text, counts) == redacted
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    ["order 24350 on 2024-01-05 at 10:30", "card 4111 1111 1111 1112 (fails Luhn)", "GB82 WEST 1234 5698 7654 33 (bad check digits)",
     "version 1.2.3 of the app", "999.1.1.1 is not an address"],
)
def test_look_alikes_are_left_alone(text):
    counts = Counter()
    assert Redactor(["email", "phone", "credit_card", "iban", "ip_address", "secret"]).redact(text, counts) == text
    assert not counts


def test_only_configured_pii_types_are_redacted():
    counts = Counter()
    assert Redactor(["email"]).redact("a@b.io 192.168.1.10", counts) == "<EMAIL> 192.168.1.10"


def test_stage_redacts_and_counts_pii_per_source(tmp_path):
    rows = [chat(i) for i in range(30)] + [{"messages": user_assistant("mail me: bob@corp.com", "Sure, at 10.0.0.1")}]
    data = prepare_data(section_for(write_jsonl(tmp_path / "a.jsonl", rows), **NO_DEDUP), tmp_path / "out")
    assert data.sources[0].pii_redacted == {"email": 1, "ip_address": 1}
    texts = (tmp_path / "out" / "train.jsonl").read_text() + (tmp_path / "out" / "eval.jsonl").read_text()
    assert "bob@corp.com" not in texts and "<EMAIL>" in texts and "<IP_ADDRESS>" in texts


def test_bad_rows_are_quarantined_with_file_row_and_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(chat(i)) for i in range(40)]
    lines = good[:10] + ['{"messages": [oops'] + good[10:] + ['{"prompt": "p"}']
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "completion": "x"}\n')
    data = prepare_data(section_for(path, max_invalid_fraction=0.1), tmp_path / "out")
    quarantined = read_jsonl(data.quarantine_path)
    assert [(q["row"], q["reason"]) for q in quarantined] == [
        (11, "invalid JSON: Expecting value at column 15"),
        (42, "unrecognised row format (keys: prompt); expected messages, conversations, instruction/output, prompt/completion, "
             "prompt/chosen/rejected or text"),
        (43, "not valid UTF-8 (invalid start byte at byte 12 of the line)"),
    ]
    assert all(q["source"] == str(path) for q in quarantined)
    assert quarantined[1]["record"] == '{"prompt": "p"}'
    counts = data.sources[0]
    assert (counts.rows_in, counts.kept, counts.quarantined) == (43, 40, 3) and counts.reconciles()
    assert data.train_rows + data.eval_rows == 40


def test_a_row_with_a_10_mb_string_is_quarantined_not_loaded_into_training(tmp_path):
    rows = [chat(i) for i in range(30)] + [{"messages": user_assistant("x" * 10_000_000, "ok")}]
    data = prepare_data(section_for(write_jsonl(tmp_path / "big.jsonl", rows), max_invalid_fraction=0.1), tmp_path / "out")
    [entry] = read_jsonl(data.quarantine_path)
    assert entry["row"] == 31 and entry["reason"] == "row has 10,000,015 characters, above data.max_row_chars=200,000"
    assert len(entry["record"]) < 2_100 and entry["record"].endswith("(10,000,087 characters)")


def test_too_many_invalid_rows_fail_the_stage(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(i) for i in range(9)] + [{"foo": "x"}])
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
        ("blank.jsonl", b"\n\n", "source has no rows"),
        ("data.txt", b"x", "unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"),
        ("bad.json", b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        ("scalar.json", b"3", "a JSON file must hold an object or a list of objects, got int"),
        ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
        ("*.nomatch.jsonl", None, "the glob matches no files"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare_data(section_for(path), tmp_path / "out")
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_truncated_last_json_line_is_quarantined(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(40)) + json.dumps(chat(40))[:25])
    data = prepare_data(section_for(path), tmp_path / "out")
    assert [(q["row"], q["reason"][:12]) for q in read_jsonl(data.quarantine_path)] == [(41, "invalid JSON")]


def test_csv_with_the_wrong_columns_is_quarantined_by_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(3)))
    with pytest.raises(DataError) as info:
        prepare_data(section_for(path), tmp_path / "out")
    assert "3 of 3 rows (100.0%) are invalid" in str(info.value)
    assert read_jsonl(tmp_path / "out" / "quarantine.jsonl")[0]["reason"].startswith("unrecognised row format (keys: answer, question)")


def test_non_utf8_csv_row_is_quarantined_by_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,completion\n" + b"".join(f"q{i},a{i}\n".encode() for i in range(30)) + "caf\xe9,x\n".encode("latin-1"))
    data = prepare_data(section_for(path), tmp_path / "out")
    assert [(q["row"], q["reason"]) for q in read_jsonl(data.quarantine_path)] == [(32, "not valid UTF-8")]


def test_column_mapping_renames_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\n" + "".join(f"q{i} text,a{i}\n" for i in range(30)))
    section = DataSection(sources=[DataSource(path=str(path), columns={"question": "prompt", "answer": "completion"})], workers=1)
    data = prepare_data(section, tmp_path / "out")
    assert data.sources[0].kept == 30 and data.sources[0].formats == {"completion": 30}


def test_mixed_formats_in_one_file_are_detected_per_row_and_reported(tmp_path):
    rows = [chat(i) for i in range(10)] + [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)] + [{"text": f"doc {i}"} for i in range(5)]
    data = prepare_data(section_for(write_jsonl(tmp_path / "m.jsonl", rows)), tmp_path / "out")
    assert data.sources[0].formats == {"chat": 10, "completion": 10, "text": 5}
    assert data.kinds == {"chat": 20, "text": 5}


def test_a_declared_format_quarantines_rows_of_another(tmp_path):
    rows = [chat(i) for i in range(40)] + [{"prompt": "p", "completion": "c"}]
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "m.jsonl", rows)), format="chat")], workers=1)
    data = prepare_data(section, tmp_path / "out")
    assert read_jsonl(data.quarantine_path)[0]["reason"] == "row looks like completion but the source says format: chat"


def test_csv_json_parquet_globs_folders_and_saved_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"prompt": f"question {i} here", "completion": f"answer {i}"} for i in range(30)]
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    with (folder / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "d.json").write_text(json.dumps([{**r, "prompt": r["prompt"] + " json"} for r in rows]))
    pq.write_table(pa.Table.from_pylist([{**r, "prompt": r["prompt"] + " pq"} for r in rows]), folder / "nested" / "d.parquet")
    Dataset.from_list([{**r, "prompt": r["prompt"] + " saved"} for r in rows]).save_to_disk(str(tmp_path / "saved"))
    data = prepare_data(section_for(folder, tmp_path / "in" / "*.csv", tmp_path / "saved", **NO_DEDUP), tmp_path / "out")
    assert [s.kept for s in data.sources] == [90, 30, 30]


def test_remote_fsspec_urls_stream_like_local_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/part-0.jsonl", "w") as f:
        f.write("".join(json.dumps(chat(i)) + "\n" for i in range(25)))
    with fs.open("/bucket/part-1.jsonl", "w") as f:
        f.write("".join(json.dumps(chat(i + 100)) + "\n" for i in range(25)) + "{broken\n")
    data = prepare_data(section_for("memory://bucket/*.jsonl", max_invalid_fraction=0.1), tmp_path / "out")
    assert [(s.path, s.kept, s.quarantined) for s in data.sources] == [("memory://bucket/*.jsonl", 50, 1)]
    assert read_jsonl(data.quarantine_path)[0]["source"] == "memory:///bucket/part-1.jsonl"
    with pytest.raises(DataError) as info:
        prepare_data(section_for("memory://bucket/none-*.jsonl"), tmp_path / "out2")
    assert str(info.value) == "memory://bucket/none-*.jsonl: the glob matches no files"


def test_hub_dataset_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    section = DataSection(sources=[DataSource(hub="acme/support-tickets", revision="v1")], workers=1)
    with pytest.raises(DataError) as info:
        prepare_data(section, tmp_path / "out")
    assert str(info.value).startswith("hub:acme/support-tickets: cannot load dataset 'acme/support-tickets' (revision v1, split 'train'); is the hub reachable")


def test_exact_and_near_duplicates_are_removed_and_counted(tmp_path):
    base = [{"messages": user_assistant(prose(i, 60), prose(10_000 + i, 20))} for i in range(200)]
    near = {"messages": user_assistant(base[5]["messages"][0]["content"], base[5]["messages"][1]["content"] + " thanks")}
    rows = base + [base[3], base[7], {"messages": [{"role": "user", "content": "  " + base[9]["messages"][0]["content"]},
                                                  base[9]["messages"][1]]}, near]
    data = prepare_data(section_for(write_jsonl(tmp_path / "d.jsonl", rows), contamination={"check": False}), tmp_path / "out")
    counts = data.sources[0]
    assert counts.removed == {"exact_duplicate": 3, "near_duplicate": 1}
    assert counts.kept == 200 and counts.reconciles()


def test_weights_and_max_samples_are_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i, "alpha") for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(i, "beta") for i in range(100)])
    section = DataSection(sources=[DataSource(path=str(a), weight=2.0), DataSource(path=str(b), weight=0.5, max_samples=60)],
                          eval_sources=[DataSource(path=str(write_jsonl(tmp_path / "e.jsonl", [chat(i, "gamma") for i in range(5)])))],
                          workers=1, contamination={"check": False})
    first = prepare_data(section, tmp_path / "o1")
    second = prepare_data(section, tmp_path / "o2")
    sa, sb = first.sources[1], first.sources[2]
    assert (sa.kept, sa.written) == (100, 200)
    assert sb.kept == 60 and sb.stopped_at_max_samples and 18 <= sb.written <= 42
    assert first.train_rows == sa.written + sb.written
    assert first.fingerprint == second.fingerprint


def test_worker_processes_give_the_same_result_as_one_process(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", read_rows(SAMPLE_TRAIN, 3000))
    one = prepare_data(section_for(path), tmp_path / "o1")
    two = prepare_data(section_for(path, workers=2), tmp_path / "o2")
    assert one.fingerprint == two.fingerprint
    assert [s.removed for s in one.sources] == [s.removed for s in two.sources]


def test_contamination_is_reported_and_removed_on_request(tmp_path):
    train = [{"messages": user_assistant(prose(i), prose(500 + i, 5))} for i in range(50)]
    evals = [{"messages": user_assistant(train[4]["messages"][0]["content"], "different answer")},
             {"messages": user_assistant("entirely unrelated words only here today", "x")}]
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "t.jsonl", train)))],
                          eval_sources=[DataSource(path=str(write_jsonl(tmp_path / "e.jsonl", evals)))], workers=1,
                          dedup={"near": False})
    report = prepare_data(section, tmp_path / "o1").contamination
    assert report["contaminated_train_rows"] == 1 and report["eval_rows_hit"] == 1 and report["removed"] == 0
    assert report["pairs"] == [{"train_row": 5, "eval_row": 1, "overlap": 1.0}]
    removed = prepare_data(section.model_copy(update={"contamination": section.contamination.model_copy(update={"remove": True})}), tmp_path / "o2")
    assert removed.contamination["removed"] == report["contaminated_train_rows"]
    assert removed.train_rows == 50 - report["contaminated_train_rows"]


def test_contamination_share_is_measured_per_n_gram(tmp_path):
    """An eval prompt of 20 words has 13 8-grams: a training row holding 8 of its words shares 1 of them (not
    contamination), one holding 15 contiguous words shares 8 of 13 (contamination at min_overlap 0.5)."""
    prompt = prose(7, 20).split()
    partial = {"messages": user_assistant(" ".join(prompt[:8] + prose(8, 20).split()), "a")}
    most = {"messages": user_assistant(" ".join(prompt[:15] + prose(9, 5).split()), "b")}
    train = [{"messages": user_assistant(prose(100 + i), "x")} for i in range(30)] + [partial, most]
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "t.jsonl", train)))],
                          eval_sources=[DataSource(path=str(write_jsonl(tmp_path / "e.jsonl", [{"messages": user_assistant(" ".join(prompt), "y")}])))],
                          workers=1, dedup={"near": False})
    report = prepare_data(section, tmp_path / "out").contamination
    assert report["pairs"] == [{"train_row": 32, "eval_row": 1, "overlap": round(8 / 13, 4)}]


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


def test_outputs_and_report_reconcile(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", read_rows(SAMPLE_TRAIN, 400))
    data = prepare_data(section_for(path), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fingerprint"] == data.fingerprint
    assert report["train_rows"] == len(read_jsonl(data.train_path)) and report["eval_rows"] == len(read_jsonl(data.eval_path))
    source = report["sources"][0]
    assert source["rows_in"] == source["kept"] + source["quarantined"] + sum(source["removed"].values()) == 400
    assert report["train_rows"] + report["eval_rows"] == source["kept"]
