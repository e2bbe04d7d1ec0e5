"""Mixture-of-experts families (Mixtral, Llama 4, DeepSeek-V3, Qwen3-MoE): train, merge and export reliably, with an
equivalence check that a router near-tie in 16 bits cannot fail and a real mismatch cannot pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.schema import ExportSection, ModelSection, TrackingSection, TrainingSection
from serving.export import MOE_MIN_AGREEMENT, ExportError, equivalence_problems, export_artifact, judge_equivalence
from tests.conftest import LINEAGE, vllm_refusals
from training.train import train

EXPERTS = {"mixtral": "mlp.experts", "llama4": "feed_forward.experts", "deepseek_v3": "mlp.experts", "qwen3_moe": "mlp.experts"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "llama4": "Llama4ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}


def train_moe(prepared, out: Path, family: str, steps: int = 20):
    section = TrainingSection(max_steps=steps, batch_size=8, learning_rate=3e-3, max_seq_length=256, backend="hf", lora={"dropout": 0})
    return train(section, ModelSection(base=f"tiny:{family}"), TrackingSection(), prepared, out, run_name="moe")


@pytest.fixture(scope="module")
def trained_mixtral(prepared_small, tmp_path_factory):
    return train_moe(prepared_small, tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.mark.parametrize("family", sorted(EXPERTS))
def test_each_moe_family_trains_its_experts_and_exports(prepared_small, tmp_path, family):
    trained = train_moe(prepared_small, tmp_path / "train", family)
    config = json.loads((Path(trained.adapter_path) / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"{EXPERTS[family]}.{p}" for p in ("gate_up_proj", "down_proj"))
    artifact = export_artifact(ExportSection(), ModelSection(base=f"tiny:{family}"), trained, prepared_small.eval_path, LINEAGE, tmp_path / "out")
    manifest = json.loads((Path(artifact.path) / "manifest.json").read_text())
    equivalence = manifest["merge"]["equivalence"]
    assert equivalence["passed"] and equivalence["mixture_of_experts"] and equivalence["weights_match_merge"]
    assert equivalence["float32_merge"]["max_abs_logit_diff"] <= 1e-3
    assert equivalence["positions_within_tolerance"] >= MOE_MIN_AGREEMENT
    assert json.loads((Path(artifact.path) / "model" / "config.json").read_text())["architectures"] == [ARCHITECTURES[family]]
    assert not manifest["adapter"]["vllm_servable"] and "target_parameters" in manifest["adapter"]["vllm_problems"][0]
    assert vllm_refusals(artifact.path) == []  # the merged model, as vLLM's own code loads it (where a vLLM environment is given)


@pytest.mark.parametrize("family", sorted(EXPERTS))
def test_an_attention_adapter_of_a_moe_family_is_one_vllm_serves(family):
    """What vLLM's LoRA serves for each MoE family: adapters on the attention projections (DeepSeek's MLA ones included)."""
    from recipes.schema import TINY_MODEL_TYPES
    from serving.checks import check_adapter_servable
    from training.families import family_for

    modules, parameters = family_for(TINY_MODEL_TYPES[family]).lora_targets("attention")
    assert parameters == [] and check_adapter_servable({"r": 16, "lora_alpha": 32, "target_modules": modules}) == []
    assert check_adapter_servable({"r": 16, "lora_alpha": 32, "target_modules": modules, "target_parameters": ["mlp.experts.down_proj"]})


def _checks(merge_diff: float = 1e-6, shipped_diff: float = 0.1, within: float = 1.0, kept: float = 1.0) -> tuple[dict, dict]:
    float32 = {"max_abs_logit_diff": merge_diff, "tolerance": 1e-3, "greedy_match": merge_diff <= 1e-3}
    shipped = {"max_abs_logit_diff": shipped_diff, "tolerance": 0.25, "positions_within_tolerance": within,
               "greedy_match": kept == 1.0, "greedy_kept": kept}
    return float32, shipped


def test_a_router_near_tie_in_16_bits_passes_a_moe_model_only():
    """Exact float32 merge and identical weights, but one position in 40 jumped when rounding picked another expert:
    a mixture-of-experts model passes; a dense model, which has no router to explain it, does not."""
    float32, shipped = _checks(shipped_diff=0.625, within=0.975, kept=0.975)
    assert judge_equivalence(float32, shipped, mixture_of_experts=True, changed_weights=[])["passed"]
    dense = judge_equivalence(float32, shipped, mixture_of_experts=False, changed_weights=[])
    assert not dense["passed"] and "max |logit diff| 0.625" in equivalence_problems(dense)[0]


@pytest.mark.parametrize(("checks", "changed", "message"), [
    (_checks(merge_diff=0.02), [], "the float32 merge differs from the adapter model: max |logit diff| 0.02"),
    (_checks(), ["model.layers.0.mlp.experts.down_proj"], "saved weights differ from the merged weights: model.layers.0.mlp.experts.down_proj"),
    (_checks(shipped_diff=2.0, within=0.5, kept=0.6), [], "positions within tolerance 50.00%"),
])
def test_a_real_mismatch_fails_a_moe_model(checks, changed, message):
    """A wrong merge, a saved tensor that is not the merged one, or disagreement at many positions: each fails even
    where a near-tie would be forgiven."""
    equivalence = judge_equivalence(*checks, mixture_of_experts=True, changed_weights=changed)
    assert not equivalence["passed"]
    assert any(message in line for line in equivalence_problems(equivalence))


def test_a_merge_that_drops_an_expert_update_fails_export(trained_mixtral, prepared_small, tmp_path, monkeypatch):
    """The merged model loses the adapter's update on one expert weight: the float32 comparison catches it."""
    from peft.tuners.tuners_utils import BaseTuner

    merge = BaseTuner.merge_and_unload

    def merge_badly(self, *args, **kwargs):
        model = merge(self, *args, **kwargs)
        weight = model.model.layers[1].mlp.experts.down_proj
        weight.data[0] += 0.5  # one expert of one layer no longer matches
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", merge_badly)
    with pytest.raises(ExportError, match="the float32 merge differs from the adapter model"):
        export_artifact(ExportSection(), ModelSection(base="tiny:mixtral"), trained_mixtral, prepared_small.eval_path, LINEAGE, tmp_path)
    assert not (tmp_path / "artifact").exists()


def test_a_saved_tensor_that_is_not_the_merged_one_fails_export(trained_mixtral, prepared_small, tmp_path, monkeypatch):
    """A shard written with one tensor altered after the merge (a bug in saving or a conversion): caught by comparing
    every saved tensor with the merged one, even if its logits would stay within a near-tie's allowance."""
    import serving.export as export
    from safetensors.torch import load_file, save_file

    ensure_index = export.ensure_index

    def alter_a_tensor(model_dir):
        shard = model_dir / "model.safetensors"
        tensors = load_file(shard)
        name = next(n for n in tensors if "router" in n or "gate.weight" in n)
        tensors[name] = tensors[name] * 1.01
        save_file(tensors, shard, metadata={"format": "pt"})
        ensure_index(model_dir)

    monkeypatch.setattr(export, "ensure_index", alter_a_tensor)
    with pytest.raises(ExportError, match="saved weights differ from the merged weights: model.layers.0"):
        export_artifact(ExportSection(), ModelSection(base="tiny:mixtral"), trained_mixtral, prepared_small.eval_path, LINEAGE, tmp_path)
