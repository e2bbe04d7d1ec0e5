"""Data stage around the model: token-length filtering, reuse by cache key, credentials, `ftpipe prepare`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.prepare import prepare_data, read_jsonl
from data_prep.readers import DataError
from data_prep.tokens import filter_token_lengths, token_length
from recipes.schema import DataSection, DataSource
from tests.conftest import ROOT, run_ftpipe, write_jsonl


def rows_of_lengths(words: list[int]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": " ".join(f"word{i}x{j}" for j in range(n))},
                          {"role": "assistant", "content": f"ok {i}"}]} for i, n in enumerate(words)]


@pytest.fixture()
def mixed_lengths(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_of_lengths([3] * 20 + [12] * 20 + [80] * 5))
    section = DataSection(sources=[DataSource(path=str(path))], eval_fraction=0.2, workers=1, dedup={"near": False},
                          contamination={"check": False})
    return section, tmp_path


def test_over_long_rows_are_dropped_and_listed(mixed_lengths, tokenizers):
    section, tmp_path = mixed_lengths
    tokenizer = tokenizers["llama"]
    lengths = [token_length(tokenizer, r) for r in rows_of_lengths([12, 80])]
    limit = (lengths[0] + lengths[1]) // 2  # between the 12-word and the 80-word rows
    data = filter_token_lengths(prepare_data(section, tmp_path / "out"), section, tokenizer, limit, "llama")
    stats = data.token_lengths
    assert stats["train"]["removed_too_long"] + stats["eval"]["removed_too_long"] == 5
    listed = read_jsonl(Path(data.train_path).parent / "too_long.jsonl")
    assert len(listed) == 5 and listed[0]["reason"] == f"longer than max_tokens={limit}"
    assert all(token_length(tokenizer, r) <= limit for r in read_jsonl(data.train_path) + read_jsonl(data.eval_path))
    assert data.train_rows + data.eval_rows == 40
    assert stats["train_percentiles"]["max"] <= limit and Path(stats["histogram"]).is_file()
    report = json.loads(Path(data.report_path).read_text())
    assert report["train_rows"] == data.train_rows and report["token_lengths"]["max_tokens"] == limit


def test_truncate_mode_keeps_over_long_rows_and_counts_them(mixed_lengths, tokenizers):
    section, tmp_path = mixed_lengths
    tokenizer = tokenizers["llama"]
    short, middle, long_ = (token_length(tokenizer, r) for r in rows_of_lengths([3, 12, 80]))
    section = section.model_copy(update={"overlong": "truncate", "min_tokens": (short + middle) // 2})
    data = filter_token_lengths(prepare_data(section, tmp_path / "out"), section, tokenizer, (middle + long_) // 2, "llama")
    stats = data.token_lengths
    assert stats["train"]["kept_over_max_for_truncation"] + stats["eval"]["kept_over_max_for_truncation"] == 5
    assert stats["train"]["removed_too_short"] + stats["eval"]["removed_too_short"] == 20
    assert data.train_rows + data.eval_rows == 25 and data.overlong == "truncate"


def test_filtering_again_with_the_same_settings_is_a_no_op(mixed_lengths, tokenizers):
    section, tmp_path = mixed_lengths
    data = filter_token_lengths(prepare_data(section, tmp_path / "out"), section, tokenizers["llama"], 40, "llama")
    before = Path(data.train_path).stat().st_mtime_ns
    again = filter_token_lengths(data, section, tokenizers["llama"], 40, "llama")
    assert again.token_lengths == data.token_lengths and Path(data.train_path).stat().st_mtime_ns == before


def test_each_model_filters_into_a_folder_of_its_own_and_the_prepared_data_stays_as_prepared(mixed_lengths, tokenizers):
    """Runs of several models share one cached data stage (a model comparison): one model's filter must not change
    what another reads."""
    section, tmp_path = mixed_lengths
    prepared = prepare_data(section, tmp_path / "out")
    before = Path(prepared.train_path).read_bytes()
    limit = token_length(tokenizers["llama"], rows_of_lengths([12])[0]) + 2
    for_llama = filter_token_lengths(prepared, section, tokenizers["llama"], limit, "llama")
    for_qwen = filter_token_lengths(prepared, section, tokenizers["qwen2"], 10_000, "qwen2")
    assert Path(prepared.train_path).read_bytes() == before and prepared.token_lengths == {}
    assert len({Path(d.train_path).parent for d in (prepared, for_llama, for_qwen)}) == 3
    assert for_llama.train_rows < for_qwen.train_rows == prepared.train_rows  # llama's limit left rows out, qwen's none
    assert json.loads(Path(for_qwen.report_path).read_text())["token_lengths"]["key"].endswith("|qwen2|1|10000|drop|4")


def test_unchanged_sources_and_recipe_reuse_the_prepared_data(mixed_lengths):
    section, tmp_path = mixed_lengths
    first = prepare_data(section, tmp_path / "out")
    mtime = Path(first.train_path).stat().st_mtime_ns
    second = prepare_data(section, tmp_path / "out")
    assert second.reused and second.fingerprint == first.fingerprint and Path(first.train_path).stat().st_mtime_ns == mtime
    changed = prepare_data(section.model_copy(update={"seed": 7}), tmp_path / "out")
    assert not changed.reused and changed.cache_key != first.cache_key
    assert not prepare_data(section, tmp_path / "out", reuse=False).reused


def test_a_rebuild_that_dies_midway_is_not_reused(mixed_lengths, monkeypatch):
    import data_prep.prepare as prepare_module

    section, tmp_path = mixed_lengths
    prepare_data(section, tmp_path / "out")
    changed = section.model_copy(update={"seed": 9})
    monkeypatch.setattr(prepare_module, "_check_contamination", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare_data(changed, tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out" / "report.json").exists()
    assert not prepare_data(section, tmp_path / "out").reused


def test_credentials_come_from_a_prefect_secret_block(prefect_server, tmp_path):
    import fsspec
    from prefect.blocks.system import Secret

    from data_prep.sources import storage_options

    options = {"skip_instance_cache": True}
    Secret(value=json.dumps(options)).save("ftpipe-test-storage", overwrite=True)
    with fsspec.filesystem("memory").open("/secure/rows.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows_of_lengths([4] * 30)))
    source = DataSource(path="memory://secure/rows.jsonl", credentials_block="ftpipe-test-storage")
    assert storage_options(source) == options
    data = prepare_data(DataSection(sources=[source], workers=1), tmp_path / "out")
    assert data.sources[0].kept == 30
    with pytest.raises(DataError) as info:
        storage_options(source.model_copy(update={"credentials_block": "no-such-block"}))
    assert str(info.value).startswith("memory://secure/rows.jsonl: cannot load credentials block 'no-such-block'")


def test_training_refuses_preference_rows_for_sft_with_the_row_named(tmp_path):
    from recipes.schema import ModelSection, TrackingSection, TrainingSection
    from training.train import train

    preference = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": [{"role": "assistant", "content": "good"}],
                   "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(10)]
    rows = rows_of_lengths([3] * 30) + preference
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "r.jsonl", rows)))], workers=1, dedup={"near": False})
    data = prepare_data(section, tmp_path / "data")
    with pytest.raises(DataError) as info:
        train(TrainingSection(max_steps=1), ModelSection(), TrackingSection(), data, tmp_path / "training")
    assert str(info.value).startswith("train.jsonl row ")
    assert " is a preference row; training.method=sft trains on chat and text rows (preference rows are for method: dpo)" in str(info.value)


@pytest.mark.slow
def test_ftpipe_prepare_writes_the_run_folder_ftpipe_run_uses_and_makes_a_missing_prefect_home(tmp_path):
    prefect_home = tmp_path / "not-made-yet" / "prefect"  # Prefect alone times out starting its server here
    result = run_ftpipe("prepare", "quickstart", "--output-dir", str(tmp_path), PREFECT_HOME=str(prefect_home))
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(prefect_home.glob("*.db")), "Prefect's database is not in the PREFECT_HOME ftpipe made"
    data_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("data: "))
    from flows.finetune import run_folder
    from recipes import load_recipe

    # the model's filtered copy of the prepared data, beside it
    assert data_dir.parent == run_folder(load_recipe(ROOT / "recipes" / "quickstart.yaml"), tmp_path) / "data"
    assert data_dir.name.startswith("for-model-") and (data_dir.parent / "train.jsonl").is_file()
    report = json.loads((data_dir / "report.json").read_text())
    assert report["token_lengths"]["train_percentiles"]["p50"] > 0
    assert all(s["rows_in"] == s["kept"] + s["quarantined"] + sum(s["removed"].values()) for s in report["sources"])
    assert (data_dir / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
