"""DPO: preference rows tokenized as a server sees them, trl's DPOTrainer on both backends, preference metrics and gates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.formats import RowError, to_canonical
from data_prep.readers import DataError
from recipes import RecipeError, load_recipe
from recipes.schema import ModelSection, TrackingSection, TrainingSection
from tests.conftest import PREFERENCE_TRAIN, ROOT, read_rows, run_ftpipe, vllm_refusals
from training.sft import tokenize_rows
from training.tokenize import MaskingError, prompt_ids
from training.train import train

DPO = TrainingSection(method="dpo", max_seq_length=256)


def test_preference_rows_become_trl_examples_with_the_serving_prompt_ids(tokenizers, tmp_path):
    tokenizer = tokenizers["llama"]
    rows = read_rows(PREFERENCE_TRAIN, 8)
    tokenized = tokenize_rows(tokenizer, rows, DPO, tmp_path)
    assert len(tokenized.examples) == 8
    for row, example in zip(rows, tokenized.examples, strict=True):
        assert set(example) == {"prompt_ids", "chosen_ids", "rejected_ids"}
        assert example["prompt_ids"] == prompt_ids(tokenizer, row["prompt"] + row["chosen"])  # what a server feeds
        assert example["chosen_ids"][-1] == example["rejected_ids"][-1] == tokenizer.eos_token_id
        assert example["chosen_ids"] != example["rejected_ids"]
    first = tokenized.sample[0]
    assert first["messages"] == rows[0]["prompt"] + rows[0]["chosen"]
    assert first["input_ids"] == tokenized.examples[0]["prompt_ids"] + tokenized.examples[0]["chosen_ids"]


def test_dpo_scores_only_the_final_answer_of_a_multi_turn_prompt(tokenizers, tmp_path):
    tokenizer = tokenizers["llama"]
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    row = {"prompt": earlier + [{"role": "user", "content": "Route: the invoice is wrong."}],
           "chosen": [{"role": "assistant", "content": '{"team": "billing"}'}],
           "rejected": [{"role": "assistant", "content": '{"team": "shipping"}'}]}
    example = tokenize_rows(tokenizer, [row], DPO.model_copy(update={"min_trained_token_fraction": 0.001}), tmp_path).examples[0]
    assert tokenizer.decode(example["chosen_ids"], skip_special_tokens=True).strip() == '{"team": "billing"}'
    assert "Hello, how can I help?" in tokenizer.decode(example["prompt_ids"])


def test_a_chat_row_in_dpo_training_is_named(tokenizers, tmp_path, sample_rows):
    rows = read_rows(PREFERENCE_TRAIN, 3) + [sample_rows[0]]
    with pytest.raises(DataError, match=r"train.jsonl row 4 is a chat row; training.method=dpo trains on preference rows"):
        tokenize_rows(tokenizers["llama"], rows, DPO, tmp_path)


def test_a_preference_row_whose_answers_are_equal_is_quarantined():
    answer = [{"role": "assistant", "content": "same"}]
    with pytest.raises(RowError, match="chosen and rejected are the same answer"):
        to_canonical({"prompt": "q", "chosen": answer, "rejected": answer})


@pytest.mark.parametrize("overrides, message", [
    (["training.method=dpo", "training.packing=true"], "packing is not available with method: dpo"),
    (["training.method=dpo", "training.lora.modules_to_save=[lm_head]"], "lm_head cannot be trained with method: dpo"),
    (["evaluation.gates=[{metric: preference_accuracy, min: 0.9}]"], "gates[0].metric 'preference_accuracy' is not measured by any suite"),
    (["evaluation.suites=[{metrics: [preference_accuracy]}]", "evaluation.gates=[]"], "evaluation.suites[0].metrics: preference_accuracy is measured on preference rows: it needs training.method: dpo"),
    (["training.method=dpo", "data.sources.0.format=chat"], "data.sources[0].format is chat but training.method=dpo trains on preference rows"),
    (["data.sources.0.format=preference"], "data.sources[0].format is preference but training.method=sft"),
])
def test_recipes_dpo_cannot_run_fail_at_validation(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    assert message in str(info.value)


def test_plain_torch_log_probs_match_log_softmax_and_carry_gradients():
    from training.dpo import PlainTorchLogProbs

    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight, bias = torch.randn(11, 8), torch.randn(11)
    targets = torch.tensor([0, 3, 10, 5, 5, 1])
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = PlainTorchLogProbs.apply(hidden, weight, bias, targets, 2.0, 4)
    logits = (hidden @ weight.T + bias) / 2.0
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(log_probs, expected[torch.arange(6), targets], atol=1e-5)
    assert torch.allclose(entropy, -(expected.exp() * expected).sum(-1), atol=1e-5)
    assert torch.allclose(log_sum_sq, torch.log((expected.exp() ** 2).sum(-1)), atol=1e-5)
    assert torch.allclose(mean_logits, logits.mean(-1)) and torch.equal(is_top1, logits.argmax(-1) == targets)
    log_probs.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_dpo_refuses_a_base_whose_vocabulary_lacks_the_template_tokens(tmp_path):
    from training.dpo import build_dpo_trainer

    class Tokenizer:
        ftpipe_added_ids, pad_token_id = [1024, 1025], 1025

    with pytest.raises(MaskingError, match="DPO cannot train new lm_head rows; train with method: sft first"):
        build_dpo_trainer(None, Tokenizer(), None, DPO, tmp_path, [])


def test_dpo_trains_with_unsloth_on_cpu_and_saves_only_the_trained_adapter(prepared_preferences, tmp_path):
    section = TrainingSection(method="dpo", max_seq_length=256, batch_size=8, learning_rate=3e-3, max_steps=3, logging_steps=1)
    result = train(section, ModelSection(), TrackingSection(), prepared_preferences, tmp_path, run_name="test")
    m = result.metrics
    assert (m["method"], m["backend"], m["steps"]) == ("dpo", "unsloth", 3)
    assert 0.05 < m["trained_token_fraction"] < 0.4 and m["batch_trained_fraction"]["batches"] == 3
    assert set(m["preference"]) == {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"}
    assert abs(m["first_logged_loss"] - 0.6931) < 1e-3  # step 1: the policy equals its reference, loss = log 2
    adapter = Path(result.adapter_path)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()


def test_dpo_recipe_learns_the_preference_and_passes_its_gates(tmp_path):
    """The shipped DPO recipe end to end on the hf backend (trl's log-prob kernel replaced on CPU)."""
    result = run_ftpipe("run", "dpo", "--set", "training.backend=hf", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next(tmp_path.glob("dpo-quickstart-*"))
    trained = json.loads((run_dir / "training" / "result.json").read_text())
    assert (trained["method"], trained["backend"]) == ("dpo", "hf")
    assert trained["first_logged_loss"] > 2 * trained["final_logged_loss"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["base"]["preference_accuracy"] < 0.7 <= 0.9 <= report["candidate"]["preference_accuracy"]
    assert report["candidate"]["preference_margin"] > report["base"]["preference_margin"] + 5
    heldout = report["suites"]["heldout"]
    example = heldout["per_example"][0]
    assert {"rejected", "base_preference_margin", "candidate_preference_margin", "outcome"} <= set(example)
    assert heldout["outcomes"]["win"] > heldout["outcomes"]["loss"]
    manifest = json.loads((run_dir / "artifact" / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and [g["metric"] for g in manifest["gates"]["results"]] == ["preference_accuracy"] * 2
    assert vllm_refusals(run_dir / "artifact") == []  # the DPO artifact, as vLLM's own code loads it (where a vLLM environment is given)
    assert manifest["merge"]["equivalence"]["passed"]


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_dpo_on_a_4bit_base(prepared_preferences, tmp_path, backend):
    section = TrainingSection(method="dpo", adapter="qlora", backend=backend, max_seq_length=256, batch_size=8, max_steps=2, logging_steps=1)
    m = train(section, ModelSection(), TrackingSection(), prepared_preferences, tmp_path, run_name="test").metrics
    assert (m["backend"], m["steps"]) == (backend, 2) and m["base_4bit_layers"] > 0
