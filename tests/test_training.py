"""Training stage: LoRA and QLoRA steps per family and backend, masking checks, tracking."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.schema import ModelSection, TrackingSection, TrainingSection
from training.tokenize import MaskingError
from training.train import train


def run_training(prepared, out: Path, family: str = "llama", tracking: TrackingSection | None = None, **training):
    section = TrainingSection(max_seq_length=256, batch_size=8, learning_rate=3e-3, logging_steps=1, **training)
    return train(section, ModelSection(base=f"tiny:{family}"), tracking or TrackingSection(), prepared, out, run_name="test")


def adapter_config(result) -> dict:
    return json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_one_training_step_per_family_and_adapter(prepared_small, tmp_path, family, adapter):
    result = run_training(prepared_small, tmp_path, family=family, adapter=adapter, max_steps=1)
    m = result.metrics
    assert m["steps"] == 1 and m["backend"] == "unsloth" and m["backend_reason"] == "auto: unsloth imports"
    assert (m["base_4bit_layers"] > 0) == (adapter == "qlora")
    assert (Path(result.adapter_path) / "adapter_model.safetensors").is_file()
    config = adapter_config(result)
    assert config["r"] == 16 and sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert 0.1 < m["trained_token_fraction"] < 0.3
    assert m["batch_trained_fraction"]["batches"] == 1


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_hf_backend_trains_on_cpu_without_triton(prepared_small, tmp_path, adapter):
    result = run_training(prepared_small, tmp_path, backend="hf", adapter=adapter, max_steps=2)
    assert result.metrics["backend"] == "hf" and result.metrics["backend_reason"] == "requested by training.backend=hf"
    assert result.metrics["steps"] == 2
    assert (result.metrics["base_4bit_layers"] > 0) == (adapter == "qlora")


def test_loss_regression_on_tiny_llama(prepared_small, tmp_path):
    """Guards training numerics: 40 steps on the routing task must cut the loss at least fivefold."""
    m = run_training(prepared_small, tmp_path, backend="hf", max_steps=40, lora={"target_modules": "attention"}).metrics
    assert m["first_logged_loss"] > 5 * m["final_logged_loss"], m


def test_implausible_masking_stops_training_with_the_reason(prepared_small, tmp_path):
    with pytest.raises(MaskingError) as info:
        run_training(prepared_small, tmp_path, max_steps=1, min_trained_token_fraction=0.5, max_trained_token_fraction=0.9)
    assert str(info.value).startswith("training data: only ")
    assert str(info.value).endswith("of tokens carry a loss, below training.min_trained_token_fraction=0.5")


def test_rows_longer_than_max_seq_length_are_listed_not_silently_cut(prepared_small, tmp_path):
    section = dict(max_steps=1)
    result = train(TrainingSection(max_seq_length=75, batch_size=8, **section), ModelSection(), TrackingSection(), prepared_small, tmp_path)
    dropped = result.metrics["dropped_rows"]
    listed = (tmp_path / "data_too_long.jsonl").read_text().splitlines()
    assert dropped > 0 and len(listed) == dropped
    assert json.loads(listed[0])["reason"] == "longer than training.max_seq_length=75"
    assert result.metrics["train_rows"] + dropped == prepared_small.train_rows


def test_wandb_offline_run_is_written(prepared_small, tmp_path):
    result = run_training(prepared_small, tmp_path, max_steps=2, tracking=TrackingSection(mode="offline", project="ftpipe-tests"))
    info = result.metrics["wandb"]
    assert info["mode"] == "offline" and info["url"] is None
    run_dir = Path(info["dir"])
    assert run_dir.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path)
    events = list(run_dir.glob("*.wandb"))
    assert events, "offline run has no .wandb event file"
    assert b"train/loss" in events[0].read_bytes() and b"train/learning_rate" in events[0].read_bytes()

    from training.tracking import log_evaluation

    log_evaluation(info, {"eval/candidate_exact_match": 0.75})
    runs = sorted(run_dir.parent.glob(f"offline-run-*-{info['id']}"))
    assert len(runs) == 2, runs  # the evaluation's part of the same run id, merged by `wandb sync`
    assert any(b"eval/candidate_exact_match" in f.read_bytes() for r in runs for f in r.glob("*.wandb"))


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_mixtral_adapts_attention_and_expert_weights(prepared_small, tmp_path, backend):
    result = run_training(prepared_small, tmp_path, family="mixtral", backend=backend, max_steps=2)
    config = adapter_config(result)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert result.metrics["steps"] == 2 and result.metrics["backend"] == backend


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_dora_rslora_and_modules_to_save_reach_the_adapter(prepared_small, tmp_path, backend):
    lora = {"target_modules": "attention", "use_dora": True, "use_rslora": True, "modules_to_save": ["lm_head"]}
    result = run_training(prepared_small, tmp_path, backend=backend, max_steps=2, lora=lora)
    config = adapter_config(result)
    assert config["use_dora"] is True and config["use_rslora"] is True and config["modules_to_save"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(Path(result.adapter_path) / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("lora_magnitude_vector" in n for n in names), "no DoRA magnitudes saved"
    assert any("lm_head" in n and "lora" not in n for n in names), "lm_head not saved in full"


def test_fp4_qlora_runs_on_hf_and_auto_says_why(prepared_small, tmp_path):
    quantization = {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"}
    m = run_training(prepared_small, tmp_path, adapter="qlora", max_steps=1, quantization=quantization).metrics
    assert m["backend"] == "hf" and m["base_4bit_layers"] > 0
    assert m["backend_reason"] == ("auto: quantization.quant_type=fp4: unsloth loads 4-bit bases as nf4; "
                                   "quantization.double_quant=false: unsloth always double-quantises")


def test_a_combination_unsloth_cannot_run_fails_at_validate():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="backend unsloth cannot run this recipe .quantization.quant_type=fp4"):
        TrainingSection(backend="unsloth", adapter="qlora", quantization={"quant_type": "fp4"})
    TrainingSection(backend="unsloth", adapter="lora", quantization={"quant_type": "fp4"})  # unused without qlora


def test_partial_and_corrupt_checkpoints_are_set_aside_for_the_previous_one(tmp_path, caplog):
    from training.checkpoints import latest_good, seal

    folder = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step != 30:  # checkpoint-30: the process died while writing it
            seal(checkpoint)
    (folder / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"weights 2X")  # same size, other bytes
    with caplog.at_level("WARNING", logger="training.checkpoints"):
        assert latest_good(folder) == (folder / "checkpoint-10", 10)
    assert sorted(p.name for p in folder.iterdir()) == ["bad-checkpoint-20", "bad-checkpoint-30", "checkpoint-10"]
    assert "skipping checkpoint-30: never finished" in caplog.text
    assert "skipping checkpoint-20: adapter_model.safetensors does not match its checksum" in caplog.text
    assert latest_good(tmp_path / "none") is None


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_packing_trains_with_rows_kept_apart(prepared_small, tmp_path, backend):
    m = run_training(prepared_small, tmp_path, backend=backend, max_steps=2, packing=True).metrics
    assert m["steps"] == 2 and m["packing_isolation_max_logit_diff"] < 1e-3
    assert m["backend"] == "hf"  # off GPU unsloth would train the rows unpacked without saying so
    if backend == "auto":
        assert m["backend_reason"] == "auto: training.packing without a GPU: unsloth turns packing off there"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_unsloth_packing_without_a_gpu_is_refused_with_the_reason(prepared_small, tmp_path):
    from training.backends import BackendError

    with pytest.raises(BackendError, match="unsloth cannot run this recipe here .training.packing without a GPU"):
        run_training(prepared_small, tmp_path, backend="unsloth", max_steps=1, packing=True)


def test_packing_check_fails_when_attention_crosses_rows(tiny_refs):
    """A model that ignores the restarted positions lets the second packed row see the first: caught."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from training.sft import check_packing_isolated

    model = AutoModelForCausalLM.from_pretrained(tiny_refs["llama"].path)

    class IgnoresPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    rows = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))}, {"input_ids": list(range(30, 45)), "labels": list(range(30, 45))}]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    assert check_packing_isolated(SimpleNamespace(data_collator=collator, model=model), rows) < 1e-3
    with pytest.raises(MaskingError, match="training.packing: attention crosses packed row boundaries"):
        check_packing_isolated(SimpleNamespace(data_collator=collator, model=IgnoresPositions()), rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0)
    with pytest.raises(MaskingError, match="does not pack rows padding-free"):
        check_packing_isolated(SimpleNamespace(data_collator=padded, model=model), rows)


def test_continued_pretraining_on_text_rows_and_whole_conversation_loss(prepared_small, tmp_path):
    from data_prep.prepare import prepare_data, read_jsonl
    from recipes.schema import DataSection, DataSource
    from tests.conftest import write_jsonl

    texts = [{"text": " ".join(m["content"] for m in row["messages"])} for row in read_jsonl(prepared_small.train_path)[:120]]
    section = DataSection(sources=[DataSource(path=str(write_jsonl(tmp_path / "text.jsonl", texts)))], workers=1, eval_fraction=0.2)
    text_data = prepare_data(section, tmp_path / "data")
    assert text_data.kinds == {"text": text_data.train_rows + text_data.eval_rows}
    m = run_training(text_data, tmp_path / "cpt", max_steps=2).metrics
    assert m["steps"] == 2 and m["trained_token_fraction"] > 0.95  # every token but the first carries a loss
    whole = run_training(prepared_small, tmp_path / "all", max_steps=1, loss_on="all").metrics
    assert whole["trained_token_fraction"] > 0.95
    assistant_only = run_training(prepared_small, tmp_path / "assistant", max_steps=1).metrics
    assert assistant_only["trained_token_fraction"] < 0.3


def test_the_adapter_config_is_written_the_same_whatever_the_set_order(tmp_path):
    """peft writes target_modules from a set, in an order that differs between processes: an unchanged recipe must
    still give the same bytes (and so the same registry version)."""
    from training.worker import canonical_adapter_config

    texts = []
    for order in (["v_proj", "q_proj", "k_proj"], ["k_proj", "v_proj", "q_proj"]):
        path = tmp_path / f"{order[0]}.json"
        path.write_text(json.dumps({"target_modules": order, "r": 8, "modules_to_save": ["lm_head", "embed_tokens"],
                                    "trainable_token_indices": {"embed_tokens": [7, 3]}}))
        canonical_adapter_config(path)
        texts.append(path.read_text())
    assert texts[0] == texts[1]
    config = json.loads(texts[0])
    assert config["target_modules"] == ["k_proj", "q_proj", "v_proj"] and config["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert config["trainable_token_indices"] == {"embed_tokens": [7, 3]}  # an order that means something stays
