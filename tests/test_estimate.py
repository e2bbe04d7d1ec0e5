"""`ftpipe estimate` and `ftpipe validate --gpu`: exact parameter counts, stated memory rules, fit warnings."""
from __future__ import annotations

import json

import pytest

from recipes.schema import TrainingSection
from tests.conftest import run_ftpipe
from training.estimate import GIB, GPUS, estimate
from training.families import family_for

LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_parameter_counts_equal_the_real_models(tiny_refs, family):
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.backends import lora_config

    training = TrainingSection(lora={"r": 8, "use_dora": family == "llama", "use_rslora": True})
    config = AutoConfig.from_pretrained(tiny_refs[family].path)
    result = estimate(config, family_for(family), training, GPUS["l4"], tokens_per_epoch=1000, rows=10)
    model = AutoModelForCausalLM.from_pretrained(tiny_refs[family].path, dtype=torch.float32)
    assert result.parameters.total == sum(p.numel() for p in model.parameters())
    adapted = get_peft_model(model, lora_config(training, family_for(family)))
    assert result.parameters.trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0


def test_an_8b_llama_needs_checkpointing_on_h100_and_does_not_fit_an_l4():
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_3_8B)
    lora = TrainingSection(batch_size=8, max_seq_length=2048, max_steps=100)
    on_h100 = estimate(config, family_for("llama"), lora, GPUS["h100"], tokens_per_epoch=10_000_000, rows=20_000)
    assert on_h100.parameters.total == 8_030_261_248  # Llama 3 8B
    assert on_h100.memory_gib["weights"] == pytest.approx(8_030_261_248 * 2 / GIB)
    assert not on_h100.fits and on_h100.fits_checkpointed
    assert on_h100.warnings() == ["warning: needs gradient checkpointing to fit the 79.6 GiB of a NVIDIA H100 80GB SXM"]
    assert on_h100.tokens_total == 100 * 8 * 500  # max_steps x batch x tokens a row
    on_l4 = estimate(config, family_for("llama"), lora, GPUS["l4"], tokens_per_epoch=10_000_000, rows=20_000)
    assert not on_l4.fits_checkpointed and on_l4.warnings()[0].startswith("warning: will not fit a NVIDIA L4 24GB")
    qlora = estimate(config, family_for("llama"), TrainingSection(adapter="qlora", batch_size=1, max_seq_length=1024), GPUS["l4"],
                     tokens_per_epoch=10_000_000, rows=20_000)
    assert 5.0 < qlora.memory_gib["weights"] < 5.6 and qlora.fits  # 4.127-bit linear layers, bf16 embeddings and head
    assert qlora.hours == pytest.approx(qlora.tokens_total / qlora.tokens_per_s / 3600)
    assert qlora.usd >= qlora.hours * GPUS["l4"].usd_per_hour


def test_validate_warns_when_the_recipe_will_not_fit_the_gpu(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_3_8B).save_pretrained(tmp_path / "llama-8b")
    result = run_ftpipe("validate", "quickstart", "--set", f"model.base={tmp_path / 'llama-8b'}", "--set", "training.batch_size=8",
                        "--set", "training.max_seq_length=2048", "--gpu", "l4")
    assert result.returncode == 0, result.stderr
    assert "warning: will not fit a NVIDIA L4 24GB" in result.stderr
    fits = run_ftpipe("validate", "quickstart", "--gpu", "l4")
    assert fits.returncode == 0 and "warning" not in fits.stderr


def test_estimate_prints_counts_from_the_prepared_data(tmp_path):
    result = run_ftpipe("estimate", "quickstart", "--gpu", "a100-80g", "--tokens-per-s", "50000", "--usd-per-hour", "2",
                        "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "parameters: 557,696 total, 65,536 trainable" in out and "at 50,000 tokens/s (given)" in out and "$2.00/h" in out
    report = json.loads(next(tmp_path.glob("quickstart-*/data/for-model-*/report.json")).read_text())  # the filtered copy training reads
    assert f"tokens: {report['token_lengths']['train_tokens']:,} a pass over the training rows" in out


def test_validate_rejects_an_adapter_the_model_family_cannot_take():
    result = run_ftpipe("validate", "quickstart", "--set", "model.base=tiny:mixtral", "--set", "training.lora.use_dora=true")
    assert result.returncode == 2
    assert result.stderr.strip() == ("training.lora.use_dora: peft cannot apply DoRA to mixtral's expert weights; "
                                     "use lora.target_modules: attention, or use_dora: false")
    experts = run_ftpipe("validate", "quickstart", "--set", "training.lora.target_modules=experts")
    assert experts.returncode == 2 and "llama has no expert layers" in experts.stderr
    offline = run_ftpipe("validate", "quickstart", "--set", "model.base=meta-llama/Llama-3.1-8B-Instruct")
    assert offline.returncode == 0 and "not available offline" in offline.stderr


def test_dpo_and_several_gpus_change_memory_time_and_cost_as_stated():
    from transformers import LlamaConfig

    config, llama = LlamaConfig(**LLAMA_3_8B), family_for("llama")
    common = dict(batch_size=4, max_seq_length=2048, epochs=1)
    sft = estimate(config, llama, TrainingSection(**common), GPUS["h100"], tokens_per_epoch=10_000_000, rows=20_000)
    dpo = estimate(config, llama, TrainingSection(method="dpo", **common), GPUS["h100"], tokens_per_epoch=10_000_000, rows=20_000)
    assert dpo.memory_gib["activations"] == pytest.approx(2 * sft.memory_gib["activations"])  # chosen + rejected
    assert dpo.tokens_total == 2 * sft.tokens_total and dpo.tokens_per_s < sft.tokens_per_s  # plus the reference forward
    eight = {"num_processes": 8}
    ddp = estimate(config, llama, TrainingSection(distributed={**eight, "strategy": "ddp"}, **common), GPUS["h100"],
                   tokens_per_epoch=10_000_000, rows=20_000)
    assert ddp.memory_gib == sft.memory_gib and ddp.tokens_per_s == pytest.approx(8 * sft.tokens_per_s)
    assert ddp.hours == pytest.approx(sft.hours / 8) and ddp.usd == pytest.approx(sft.usd, abs=0.02)
    assert ddp.lines()[0].startswith("gpu: 8 x NVIDIA H100")
    fsdp = estimate(config, llama, TrainingSection(distributed={**eight, "strategy": "fsdp"}, **common), GPUS["h100"],
                    tokens_per_epoch=10_000_000, rows=20_000)
    assert fsdp.memory_gib["weights"] == pytest.approx(sft.memory_gib["weights"] / 8)
    zero2 = estimate(config, llama, TrainingSection(distributed={**eight, "strategy": "deepspeed_zero2"}, **common), GPUS["h100"],
                     tokens_per_epoch=10_000_000, rows=20_000)
    assert zero2.memory_gib["weights"] == sft.memory_gib["weights"]
    assert zero2.memory_gib["adapter+optimizer"] == pytest.approx(sft.memory_gib["adapter+optimizer"] * (4 + 12 / 8) / 16)
