"""The real chat templates of the families users bring (tests/templates), on local folders with each model's special
tokens: every template trains as a server renders it, history rewriting and reasoning included; tokens are added only
when truly missing; the date a template prints is pinned."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.formats import THINK_CLOSE
from recipes.schema import ModelSection
from tests.conftest import SAMPLE_TRAIN, read_rows, vllm_refusals, write_jsonl
from tests.real_families import REAL_MODELS, build_real_model, multi_turn_rows
from training.tokenize import IGNORE, describe_template, encode_conversation, template_messages, template_mode

SYSTEM, Q1, A1, Q2, A2 = "Answer briefly.", "Capital of France?", "Paris", "And of Italy?", "Rome"
SINGLE = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
MULTI = SINGLE + [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
REASONING = [*SINGLE[:2], {"role": "assistant", "content": A1, "reasoning_content": "France: Paris."},
             {"role": "user", "content": Q2}, {"role": "assistant", "content": f"<think>\nItaly: Rome.\n</think>\n\n{A2}"}]

# How each real template must encode a multi-turn conversation, and the text the model must generate for its last turn
EXPECTED = {
    "llama-3.1-instruct": ("one-pass", "Rome<|eot_id|>"),
    "llama-3.2-instruct": ("one-pass", "Rome<|eot_id|>"),
    "qwen2.5-instruct": ("one-pass", "Rome<|im_end|>\n"),
    "qwen3": ("per-turn", "<think>\n\n</think>\n\nRome<|im_end|>\n"),  # the last turn gets an empty reasoning block
    "mistral-v0.3-instruct": ("per-turn", " Rome</s>"),  # the system prompt moves into the last user turn
    "mistral-nemo-instruct": ("per-turn", "Rome</s>"),
    "mixtral-instruct": ("one-pass", " Rome</s>"),
    "deepseek-r1-distill": ("per-turn", "\n</think>\n\nRome<｜end▁of▁sentence｜>"),  # the prompt opened <think>
}
REASONING_COMPLETION = {  # the last turn of REASONING, whose reasoning was given as <think> in the content
    "qwen3": "<think>\nItaly: Rome.\n</think>\n\nRome<|im_end|>\n",
    "deepseek-r1-distill": "Italy: Rome.\n</think>\n\nRome<｜end▁of▁sentence｜>",
    "llama-3.1-instruct": "<think>\nItaly: Rome.\n</think>\n\nRome<|eot_id|>",  # a template without reasoning: inside the answer
    "mistral-v0.3-instruct": " <think>\nItaly: Rome.\n</think>\n\nRome</s>",
}


@pytest.fixture(scope="session")
def real_folders(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-models")
    return {name: build_real_model(model, corpus, root / name) for name, model in REAL_MODELS.items()}


def real_tokenizer(folder: Path, **model_options):
    from training.models import BaseModelRef, load_tokenizer, resolve_base

    section = ModelSection(base=str(folder), **model_options)
    ref = resolve_base(section, lambda: [])
    return load_tokenizer(BaseModelRef(str(folder), None, str(folder), ref.model_type), section, render_date="2026-01-05")


def server_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """What an OpenAI-compatible server feeds the model for this conversation: apply_chat_template, tokenized."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                              **tokenizer.ftpipe_render.template_kwargs()))


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
@pytest.mark.parametrize("conversation", [SINGLE, MULTI, REASONING], ids=["single", "multi", "reasoning"])
def test_every_example_is_the_servers_prompt_then_the_turn_to_generate(real_folders, name, conversation):
    """Each example's prompt is token for token what the server renders for the conversation before that turn; its
    labels are exactly the completion, which ends on the end-of-turn token the server stops on."""
    from data_prep.formats import canonical_messages

    tokenizer = real_tokenizer(real_folders[name])
    examples = encode_conversation(tokenizer, conversation)
    messages = canonical_messages(conversation)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [e.turn for e in examples] == (assistant_turns if len(examples) > 1 else assistant_turns[-1:])
    for example in examples:
        start = example.prompt_length
        history = template_messages(tokenizer, messages)[: example.turn]  # a template without reasoning gets it in the answers
        assert example.input_ids[:start] == server_prompt(tokenizer, history)
        completion = example.labels[start:]
        assert example.labels[start - 1] == IGNORE and completion == example.input_ids[start:]
        if len(examples) > 1:  # a per-turn example trains its own turn only
            assert example.labels[:start] == [IGNORE] * start
        assert tokenizer.eos_token_id in completion[-2:] and tokenizer.decode(completion).rstrip("\n").endswith(tokenizer.eos_token)
    if conversation is MULTI:
        mode, completion = EXPECTED[name]
        assert template_mode(tokenizer, MULTI) == mode
        assert tokenizer.decode(examples[-1].input_ids[examples[-1].prompt_length:]) == completion
        if mode == "per-turn":
            assert tokenizer.decode(examples[-1].input_ids[: examples[-1].prompt_length]) == \
                tokenizer.apply_chat_template(MULTI[:4], tokenize=False, add_generation_prompt=True, **tokenizer.ftpipe_render.template_kwargs())
    if conversation is REASONING and name in REASONING_COMPLETION:
        assert tokenizer.decode(examples[-1].input_ids[examples[-1].prompt_length:]) == REASONING_COMPLETION[name]


def test_text_the_base_spells_in_pieces_stays_text(real_folders):
    """Mixtral's tokenizer has no [INST] token: the marker is spelled in pieces, as the real model read it in training;
    no token is added, so the vocabulary, the embeddings and vLLM's LoRA stay as they are."""
    from transformers import AutoTokenizer

    tokenizer = real_tokenizer(real_folders["mixtral-instruct"])
    assert tokenizer.ftpipe_added_ids == [] and len(tokenizer) == len(AutoTokenizer.from_pretrained(real_folders["mixtral-instruct"]))
    assert "[INST]" not in tokenizer.get_vocab()
    prompt = tokenizer.decode(server_prompt(tokenizer, SINGLE[:2]))
    assert prompt == "<s> [INST] Answer briefly.\n\nCapital of France? [/INST]"
    assert len(tokenizer(" [INST]", add_special_tokens=False)["input_ids"]) > 1


def test_a_pad_equal_to_eos_takes_an_unused_special_token_not_a_new_one(real_folders):
    """DeepSeek-R1-Distill pads with its end-of-sentence token: the pad becomes a special token the vocabulary already
    has and the template never writes; nothing is added; the end-of-turn stays the template's own."""
    from transformers import AutoTokenizer

    tokenizer = real_tokenizer(real_folders["deepseek-r1-distill"])
    original = AutoTokenizer.from_pretrained(real_folders["deepseek-r1-distill"])
    assert original.pad_token_id == original.eos_token_id
    assert tokenizer.ftpipe_added_ids == [] and len(tokenizer) == len(original)
    assert tokenizer.eos_token == "<｜end▁of▁sentence｜>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token in original.get_vocab() and tokenizer.pad_token not in original.chat_template


def test_the_end_of_turn_is_read_from_the_template_not_assumed_from_the_family(real_folders):
    """R1-Distill has a Qwen architecture (model_type qwen2) but ends turns with <｜end▁of▁sentence｜>, not <|im_end|>."""
    assert {name: real_tokenizer(folder).eos_token for name, folder in real_folders.items()} == {
        "llama-3.1-instruct": "<|eot_id|>", "llama-3.2-instruct": "<|eot_id|>", "qwen2.5-instruct": "<|im_end|>", "qwen3": "<|im_end|>",
        "mistral-v0.3-instruct": "</s>", "mistral-nemo-instruct": "</s>", "mixtral-instruct": "</s>",
        "deepseek-r1-distill": "<｜end▁of▁sentence｜>"}


def test_a_template_that_prints_the_date_renders_the_recorded_date(real_folders, tmp_path):
    """Llama 3.2 writes today's date into every prompt: ftpipe renders the run's recorded date (or model.template_date),
    so the same rows give the same ids on another day; without it they would not."""
    from training.train import run_render_date

    folder = real_folders["llama-3.2-instruct"]
    first, later = real_tokenizer(folder), real_tokenizer(folder)
    assert encode_conversation(first, SINGLE)[0].input_ids == encode_conversation(later, SINGLE)[0].input_ids
    assert "Today Date: 05 Jan 2026" in first.decode(encode_conversation(first, SINGLE)[0].input_ids)
    pinned = real_tokenizer(folder, template_date="2025-03-04")
    assert "Today Date: 04 Mar 2025" in pinned.decode(encode_conversation(pinned, SINGLE)[0].input_ids)
    unpinned = [first.apply_chat_template(SINGLE, tokenize=False, strftime_now=lambda fmt, d=d: d) for d in ("01 Jan 2026", "02 Jan 2026")]
    assert unpinned[0] != unpinned[1]  # what a template reading the clock would do from one day to the next
    assert run_render_date(tmp_path) == run_render_date(tmp_path)  # a retried or resumed run keeps its first date
    (tmp_path / "render_date.txt").write_text("2020-02-02")
    assert run_render_date(tmp_path) == "2020-02-02"
    assert any("prints today's date" in line for line in describe_template(first))


def test_thinking_off_is_rendered_from_chat_template_kwargs(real_folders):
    """model.chat_template_kwargs reach every rendering: Qwen3 with enable_thinking false puts the empty reasoning
    block in the prompt, so the model learns to answer directly after it."""
    tokenizer = real_tokenizer(real_folders["qwen3"], chat_template_kwargs={"enable_thinking": False})
    example = encode_conversation(tokenizer, SINGLE)[-1]
    assert tokenizer.decode(example.input_ids[: example.prompt_length]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tokenizer.decode(example.input_ids[example.prompt_length:]) == "Paris<|im_end|>\n"


@pytest.mark.parametrize(("name", "lines"), [
    ("qwen3", ["single-turn rows one-pass, multi-turn rows per-turn", "drops the reasoning of turns before the last user message"]),
    ("mistral-v0.3-instruct", ["multi-turn rows per-turn", "moves the system prompt into the last user turn"]),
    ("deepseek-r1-distill", ["single-turn rows per-turn", "its generation prompt opens <think>"]),
    ("llama-3.1-instruct", ["single-turn rows one-pass, multi-turn rows one-pass", "knows no reasoning"]),
])
def test_validate_says_which_mode_the_template_needs_and_what_it_rewrites(real_folders, name, lines):
    from tests.conftest import run_ftpipe

    result = run_ftpipe("validate", "quickstart", "--set", f"model.base={real_folders[name]}")
    assert result.returncode == 0, result.stderr
    for line in lines:
        assert line in result.stdout, result.stdout


def test_rows_a_template_cannot_render_are_set_aside_with_their_number(tmp_path, tokenizers):
    """A template that raises on some rows (here: one refusing a word) never stops the data stage: those rows are
    counted and listed with their row number and the template's message."""
    from data_prep.prepare import prepare_data, read_jsonl
    from data_prep.tokens import filter_token_lengths
    from recipes.schema import DataSection, DataSource

    rows = read_rows(SAMPLE_TRAIN, 30)
    rows[4]["messages"][1]["content"] = "forbidden word here"
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "rows.jsonl", rows)))], eval_fraction=0.1)
    tokenizer = tokenizers["llama"].__class__.from_pretrained(tokenizers["llama"].name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
                               "{% endif %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    data = filter_token_lengths(prepare_data(section, tmp_path / "out"), section, tokenizer, 1000, "forbidding")
    stats = data.token_lengths
    assert stats["train"]["removed_unrenderable"] + stats["eval"]["removed_unrenderable"] == 1
    listed = [r for r in read_jsonl(Path(data.train_path).parent / "too_long.jsonl") if "cannot render" in r["reason"]]
    assert len(listed) == 1 and "no forbidden words" in listed[0]["reason"] and listed[0]["row"] >= 1
    assert data.train_rows + data.eval_rows == 29


@pytest.mark.parametrize(("message", "expected"), [
    ({"role": "assistant", "content": "A", "reasoning_content": "R"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}),
    ({"role": "assistant", "content": "A", "reasoning": "R"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}),
    ({"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}, {"role": "assistant", "content": "A", "reasoning_content": "R"}),
    ({"role": "assistant", "content": "A", "reasoning_content": ""}, {"role": "assistant", "content": "A"}),
])
def test_reasoning_is_read_as_apis_return_it(message, expected):
    from data_prep.formats import to_canonical

    _, row = to_canonical({"messages": [{"role": "user", "content": "Q"}, message]}, "chat")
    assert row["messages"][1] == expected


@pytest.mark.parametrize(("message", "error"), [
    ({"role": "user", "content": "Q", "reasoning_content": "R"}, "messages[0].reasoning_content: only assistant messages carry reasoning"),
    ({"role": "assistant", "content": "A", "reasoning_content": "R", "reasoning": "R"}, "give the reasoning once"),
])
def test_misplaced_reasoning_is_refused_with_the_field(message, error):
    from data_prep.formats import RowError, to_canonical

    messages = [message] if message["role"] == "user" else [{"role": "user", "content": "Q"}, message]
    with pytest.raises(RowError, match=error.replace("[", r"\[").replace("]", r"\]")):
        to_canonical({"messages": messages}, "chat")


@pytest.mark.parametrize(("text", "opened", "reasoning", "answer"), [
    ("<think>\nR\n</think>\n\nA", False, "R", "A"),
    ("R\n</think>\n\nA", True, "R", "A"),  # DeepSeek-R1: the prompt opened <think>
    ("still thinking", True, "still thinking", ""),  # cut off inside the reasoning: no answer yet
    ("plain answer", False, "", "plain answer"),
])
def test_answers_are_scored_without_their_reasoning(text, opened, reasoning, answer):
    from data_prep.formats import split_reasoning

    assert split_reasoning(text, opened) == (reasoning, answer)


@pytest.fixture(scope="module")
def prepared_multi_turn(tmp_path_factory):
    """Single-turn ticket rows and multi-turn ones with a system prompt, half of them with reasoning."""
    from data_prep.prepare import prepare_data
    from recipes.schema import DataSection, DataSource

    folder = tmp_path_factory.mktemp("multi-turn")
    rows = read_rows(SAMPLE_TRAIN, 600)
    train = write_jsonl(folder / "train.jsonl", multi_turn_rows(rows[:400]) + rows[400:560])
    held_out = write_jsonl(folder / "heldout.jsonl", rows[560:600])
    section = DataSection(sources=[DataSource(path=str(train))], eval_sources=[DataSource(path=str(held_out))])
    return prepare_data(section, folder / "out")


@pytest.mark.parametrize("name", ["qwen3", "deepseek-r1-distill", "mistral-v0.3-instruct", "mixtral-instruct", "llama-3.2-instruct"])
def test_real_templates_train_and_export_with_the_template_unchanged(real_folders, prepared_multi_turn, tmp_path, name):
    """Train on single- and multi-turn rows with system prompts and reasoning, then export: the export's own check
    re-renders the rows training saw with the shipped tokenizer (ids equal, example by example); the artifact
    ships the real template byte for byte and stops on the template's end-of-turn token."""
    from recipes.schema import ExportSection, TrackingSection, TrainingSection
    from serving.export import export_artifact
    from tests.conftest import LINEAGE
    from training.train import train

    folder = real_folders[name]
    model = ModelSection(base=str(folder))
    section = TrainingSection(max_steps=8, batch_size=8, learning_rate=3e-3, max_seq_length=256, backend="hf", lora={"dropout": 0})
    trained = train(section, model, TrackingSection(), prepared_multi_turn, tmp_path / "train", run_name=name)
    per_turn = EXPECTED[name][0] == "per-turn"
    chat = trained.metrics["chat_template"]
    assert (chat["per_turn_rows"] == 200) == per_turn and trained.metrics["train_examples"] == trained.metrics["train_rows"] + chat["per_turn_rows"]
    assert chat["date"] and chat["end_of_turn"] == real_tokenizer(folder).eos_token
    artifact = export_artifact(ExportSection(), model, trained, prepared_multi_turn.eval_path, LINEAGE, tmp_path / "out")
    shipped = Path(artifact.path) / "model"
    assert (shipped / "chat_template.jinja").read_text(encoding="utf-8") == REAL_MODELS[name].chat_template()
    eos_id = real_tokenizer(folder).eos_token_id
    assert eos_id in json.loads((shipped / "generation_config.json").read_text())["eos_token_id"]
    assert artifact.manifest["merge"]["equivalence"]["template_rows_checked"] >= 16
    assert artifact.manifest["training"]["chat_template"]["reasoning"] == {"qwen3": "template", "deepseek-r1-distill": "forced"}.get(name, "inline")
    assert vllm_refusals(artifact.path) == []  # vLLM's renderer gives training's prompt ids with the real template


@pytest.mark.slow
def test_the_quickstart_runs_on_a_reasoning_model_folder_with_multi_turn_rows(real_folders, prepared_multi_turn, tmp_path):
    """`ftpipe run quickstart` on a local DeepSeek-R1-Distill folder (its template opens <think> in every prompt and cuts
    reasoning from history) with multi-turn, system-prompt and reasoning rows: every stage completes, and evaluation
    reports the reasoning the candidate writes apart from the answer it scores. Gates are off: a random model learns
    little in 40 steps."""
    from tests.conftest import run_ftpipe

    train = Path(prepared_multi_turn.train_path)
    result = run_ftpipe("run", "quickstart", "--set", f"model.base={real_folders['deepseek-r1-distill']}",
                        "--set", f'data.sources=[{{"path": "{train}"}}]', "--set", "training.max_steps=40",
                        "--set", "evaluation.max_samples=8", "--set", "evaluation.generation.max_new_tokens=24",
                        "--set", "evaluation.gates=[]", "--set", "evaluation.safety.max_new_tokens=4", "--set", "model.template_date=2025-06-30",
                        "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["training"]["chat_template"] == {"date": "2025-06-30", "chat_template_kwargs": {}, "reasoning": "forced",
                                                     "per_turn_rows": 200, "end_of_turn": "<｜end▁of▁sentence｜>"}
    assert manifest["merge"]["equivalence"]["passed"]
    report = json.loads(Path(manifest["evaluation"]["report_path"]).read_text())
    assert set(report["suites"]["heldout"]["reasoning"]) == {"base", "candidate"}
    assert all(THINK_CLOSE not in e["candidate_output"] for e in report["suites"]["heldout"]["per_example"])
