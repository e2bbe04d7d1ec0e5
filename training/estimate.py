"""What a recipe will cost before it runs: parameters, peak GPU memory, tokens, time and money.

Parameters are counted exactly, by building the model on PyTorch's meta device (no weights, no memory) and
wrapping it with the recipe's peft config. Memory, throughput and price are estimates from stated rules,
printed with the result so a reader can check them:
- weights: 2 bytes a parameter (bf16); QLoRA's quantised linear layers 4 bits plus their constants (0.5 bit a
  weight for blocks of 64, 0.127 with double quantisation);
- adapter: 16 bytes a trainable parameter (fp32 weight, gradient and two Adam moments);
- activations, 16-bit, flash attention: 2 bytes x (8 hidden + 4 intermediate) a token a layer; with gradient
  checkpointing, 2 bytes x hidden a token a layer plus one layer in full; logits 6 bytes a token a vocabulary
  entry (bf16 logits and their fp32 loss copy);
- 1 GiB for the CUDA context and allocator;
- throughput: 4 x parameters FLOPs a token (forward, and backward to the activations only, since the base is
  frozen), 6 x with checkpointing, at 35% of the GPU's dense bf16 peak (25% for QLoRA, which dequantises);
- DPO: every row is two sequences (prompt + chosen, prompt + rejected), so twice the tokens and activations, plus
  a reference forward without gradients (2 x parameters FLOPs a token);
- several processes (training.distributed): memory is per GPU; fsdp and ZeRO-3 divide the weights and the adapter
  state by the number of GPUs, ZeRO-2 the optimizer state (12 of the 16 bytes); throughput scales linearly and
  the cost counts every GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from recipes.schema import SHARDED_STRATEGIES, TrainingSection
from training.families import Family

GIB = 2**30
CONTEXT_BYTES = GIB


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense
    usd_per_hour: float  # a stated on-demand price; override with --usd-per-hour


GPUS = {
    "h100": GPU("NVIDIA H100 80GB SXM", 79.6, 989.0, 3.00),
    "a100-80g": GPU("NVIDIA A100 80GB", 79.2, 312.0, 1.80),
    "l4": GPU("NVIDIA L4 24GB", 22.0, 121.0, 0.70),
}


@dataclass(frozen=True)
class Parameters:
    total: int
    trainable: int
    quantisable: int  # in the linear layers QLoRA stores in 4 bits


@dataclass
class Estimate:
    gpu: GPU
    parameters: Parameters
    memory_gib: dict[str, float]  # component -> GiB, without gradient checkpointing
    peak_gib: float
    peak_checkpointed_gib: float
    tokens_per_epoch: int
    tokens_total: int
    tokens_per_s: float
    tokens_per_s_stated: bool  # given by the user rather than estimated
    hours: float
    usd: float
    processes: int = 1

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu.memory_gib

    @property
    def fits_checkpointed(self) -> bool:
        return self.peak_checkpointed_gib <= self.gpu.memory_gib

    def lines(self) -> list[str]:
        p = self.parameters
        gpus = f"{self.processes} x " if self.processes > 1 else ""
        rate = "given" if self.tokens_per_s_stated else "estimated: see `ftpipe estimate --help`"
        lines = [
            f"gpu: {gpus}{self.gpu.name} ({self.gpu.memory_gib:g} GiB, {self.gpu.bf16_tflops:g} TFLOPS bf16, ${self.gpu.usd_per_hour:.2f}/h)",
            f"parameters: {p.total:,} total, {p.trainable:,} trainable ({100 * p.trainable / p.total:.3f}%)",
            "peak memory per GPU: " + ", ".join(f"{k} {v:.2f}" for k, v in self.memory_gib.items()) + " GiB",
            f"  = {self.peak_gib:.1f} GiB without gradient checkpointing, {self.peak_checkpointed_gib:.1f} GiB with it",
            f"tokens: {self.tokens_per_epoch:,} a pass over the training rows, {self.tokens_total:,} in this run",
            f"time: {self.hours:.2f} h at {self.tokens_per_s:,.0f} tokens/s ({rate}); cost ${self.usd:,.2f}",
        ]
        return lines + self.warnings()

    def warnings(self) -> list[str]:
        if self.fits:
            return []
        if self.fits_checkpointed:
            return [f"warning: needs gradient checkpointing to fit the {self.gpu.memory_gib:g} GiB of a {self.gpu.name}"]
        return [f"warning: will not fit a {self.gpu.name} ({self.peak_checkpointed_gib:.1f} GiB needed even with gradient "
                f"checkpointing, {self.gpu.memory_gib:g} GiB there): use qlora, a smaller batch_size or max_seq_length, or a larger GPU"]


def count_parameters(config, training: TrainingSection, family: Family) -> Parameters:
    """Exact counts from the model built on the meta device with the recipe's adapter."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from training.backends import lora_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        head = model.get_output_embeddings()
        quantisable = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
        adapted = get_peft_model(model, lora_config(training, family))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return Parameters(total=total, trainable=trainable, quantisable=quantisable)


def memory_bytes(config, parameters: Parameters, training: TrainingSection) -> tuple[dict[str, float], float]:
    """(components in bytes without gradient checkpointing, activations with it)."""
    if training.adapter == "qlora":
        bits = 4 + (0.127 if training.quantization.double_quant else 0.5)
        weights = parameters.quantisable * bits / 8 + (parameters.total - parameters.quantisable) * 2
    else:
        weights = parameters.total * 2
    tokens = training.batch_size * training.max_seq_length * sequences_per_row(training)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_layer = 2 * (8 * hidden + 4 * intermediate) * tokens
    logits = 6 * tokens * config.vocab_size
    adapter_state = 16 * parameters.trainable
    processes, strategy = training.distributed.num_processes, training.distributed.strategy
    if strategy in SHARDED_STRATEGIES:
        weights, adapter_state = weights / processes, adapter_state / processes
    elif strategy == "deepspeed_zero2":
        adapter_state = 4 * parameters.trainable + 12 * parameters.trainable / processes
    components = {"weights": weights, "adapter+optimizer": adapter_state,
                  "activations": per_layer * layers, "logits": logits, "cuda context": CONTEXT_BYTES}
    checkpointed = 2 * hidden * tokens * layers + per_layer
    return components, checkpointed


def sequences_per_row(training: TrainingSection) -> int:
    """DPO scores each row twice: the prompt with the chosen answer and with the rejected one."""
    return 2 if training.method == "dpo" else 1


def estimate(config, family: Family, training: TrainingSection, gpu: GPU, tokens_per_epoch: int, rows: int,
             tokens_per_s: float | None = None) -> Estimate:
    parameters = count_parameters(config, training, family)
    components, checkpointed_activations = memory_bytes(config, parameters, training)
    peak = sum(components.values())
    peak_checkpointed = peak - components["activations"] + checkpointed_activations
    processes = training.distributed.num_processes
    tokens_per_epoch *= sequences_per_row(training)
    if training.max_steps:
        per_row = tokens_per_epoch / max(rows, 1)
        tokens_total = int(training.max_steps * training.batch_size * training.gradient_accumulation_steps * processes * per_row)
    else:
        tokens_total = int(tokens_per_epoch * training.epochs)
    stated = tokens_per_s is not None
    if tokens_per_s is None:
        utilisation = 0.25 if training.adapter == "qlora" else 0.35
        reference = 2 if training.method == "dpo" else 0  # DPO's reference forward
        flops_per_token = ((4 if peak <= gpu.memory_gib * GIB else 6) + reference) * parameters.total
        tokens_per_s = utilisation * gpu.bf16_tflops * 1e12 / flops_per_token * processes
    hours = tokens_total / tokens_per_s / 3600
    return Estimate(processes=processes,
        gpu=gpu, parameters=parameters, memory_gib={k: v / GIB for k, v in components.items()}, peak_gib=peak / GIB,
        peak_checkpointed_gib=peak_checkpointed / GIB, tokens_per_epoch=tokens_per_epoch, tokens_total=tokens_total,
        tokens_per_s=tokens_per_s, tokens_per_s_stated=stated, hours=hours, usd=math.ceil(hours * gpu.usd_per_hour * processes * 100) / 100,
    )
