"""CUDA paths: 4-bit QLoRA through bitsandbytes' CUDA kernels and trl's fused LM-head loss. Skipped without a GPU."""
from __future__ import annotations

import pytest

from tests.test_training import run_training

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_qlora_trains_on_cuda(prepared_small, tmp_path, backend):
    result = run_training(prepared_small, tmp_path, backend=backend, adapter="qlora", max_steps=5)
    m = result.metrics
    assert m["device"] == "cuda" and m["backend"] == backend
    assert m["base_4bit_layers"] > 0 and m["steps"] == 5
    assert m["final_logged_loss"] < m["first_logged_loss"]


def _llama_1b(tiny_refs, folder):
    """A random Llama with Llama-3.2-1B's layer shapes (the tiny tokenizer's vocabulary), saved with that tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_refs["llama"].path)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_qlora_on_a_1b_shaped_llama_reports_speed_and_memory(prepared_small, tiny_refs, tmp_path, backend):
    from recipes.schema import ModelSection, TrackingSection, TrainingSection
    from training.train import train

    parameters = _llama_1b(tiny_refs, tmp_path / "llama-1b")
    section = TrainingSection(adapter="qlora", backend=backend, max_steps=10, batch_size=8, max_seq_length=256, logging_steps=1)
    m = train(section, ModelSection(base=str(tmp_path / "llama-1b")), TrackingSection(), prepared_small, tmp_path / "run").metrics
    print(f"\n{backend}: {parameters / 1e9:.2f}B parameters, {m['tokens_per_s']} tokens/s, peak {m['peak_memory_mb']}")
    assert m["device"] == "cuda" and m["steps"] == 10 and m["base_4bit_layers"] == 16 * 7
    assert m["peak_memory_mb"]["device"] == "cuda" and m["peak_memory_mb"]["mb"] < 8_000


@pytest.mark.parametrize("script", ["serve.sh", "serve-lora.sh"])
def test_vllm_serves_the_artifact_and_the_smoke_test_passes(artifact, prepared_small, script):
    """The artifact's own launch script with a full vLLM environment (`ftpipe vllm-env .vllm --full`) on the GPU: the
    merged model, then the base with the adapter; `ftpipe smoke` must get the task right through the chat endpoint."""
    from tests.conftest import serve_with_vllm_and_smoke

    serve_with_vllm_and_smoke(artifact.path, script, prepared_small.eval_path)
