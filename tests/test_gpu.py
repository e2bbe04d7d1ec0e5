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
