"""Load the base model with its LoRA/QLoRA adapter through unsloth or through transformers + peft.

unsloth patches transformers and trl when imported, so the training worker imports it (or not) before
anything else: one process, one backend.
"""
from __future__ import annotations

import importlib.util
import logging

from recipes.schema import LoraSection, TrainingSection, unsloth_cannot_run
from training.families import Family, UnsupportedFamilyError, adapter_problems
from training.models import BaseModelRef, fit_embeddings

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    pass


def choose_backend(training: TrainingSection) -> tuple[str, str]:
    """Return (backend, why) for training.backend auto | unsloth | hf."""
    requested = training.backend
    if requested == "hf":
        return "hf", "requested by training.backend=hf"
    if importlib.util.find_spec("unsloth") is None:
        if requested == "unsloth":
            raise BackendError("training.backend=unsloth but unsloth is not installed; install it or use backend: hf")
        return "hf", "auto: unsloth is not installed"
    reasons = unsloth_cannot_run(training) + _unsloth_cannot_run_here(training)
    if requested == "unsloth":
        if reasons:
            raise BackendError(f"training.backend=unsloth cannot run this recipe here ({'; '.join(reasons)}); use backend: hf or auto")
        return "unsloth", "requested by training.backend=unsloth"
    if reasons:
        return "hf", "auto: " + "; ".join(reasons)
    return "unsloth", "auto: unsloth imports"


def _unsloth_cannot_run_here(training: TrainingSection) -> list[str]:
    """What unsloth does not do on this machine (found by running it: without a GPU it trains packed
    recipes unpacked, silently)."""
    import torch

    if training.packing and not torch.cuda.is_available():
        return ["training.packing without a GPU: unsloth turns packing off there"]
    return []


def training_dtype():
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def device_map() -> dict | None:
    """Each process loads the model onto its own GPU (LOCAL_RANK under accelerate launch); on CPU the Trainer
    places it. Without this, every DDP process would load onto GPU 0."""
    import os

    import torch

    return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"} if torch.cuda.is_available() else None


def compute_dtype(training: TrainingSection):
    """The dtype QLoRA's 4-bit layers compute in."""
    import torch

    name = training.quantization.compute_dtype
    return training_dtype() if name == "auto" else getattr(torch, name)


def load_unsloth(ref: BaseModelRef, training: TrainingSection, trust_remote_code: bool, tokenizer):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=ref.path,
        revision=ref.revision,
        max_seq_length=training.max_seq_length,
        dtype=training_dtype(),
        load_in_4bit=training.adapter == "qlora",
        trust_remote_code=trust_remote_code,
        **({"device_map": placement} if (placement := device_map()) else {}),
    )
    fit_embeddings(model, tokenizer)
    lora = training.lora
    modules, parameters = adapter_targets(ref.family, lora)
    token_rows = new_token_rows(tokenizer)
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save or None,
        bias="none",
        use_gradient_checkpointing=False,
        random_state=training.seed,
        **({"use_dora": True} if lora.use_dora else {}),
        **({"trainable_token_indices": token_rows} if token_rows else {}),
    )


def load_hf(ref: BaseModelRef, training: TrainingSection, trust_remote_code: bool, tokenizer):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = training_dtype()
    kwargs = {}
    if training.adapter == "qlora":
        quantization = training.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(training),
        )
    model = AutoModelForCausalLM.from_pretrained(
        ref.path, revision=ref.revision, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map(), **kwargs
    )
    fit_embeddings(model, tokenizer)
    if training.adapter == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())
    return get_peft_model(model, lora_config(training, ref.family, new_token_rows(tokenizer)))


def lora_config(training: TrainingSection, family: Family, token_rows: dict | None = None):
    from peft import LoraConfig

    lora = training.lora
    modules, parameters = adapter_targets(family, lora)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save or None,
        trainable_token_indices=token_rows or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_targets(family: Family, lora: LoraSection) -> tuple[list[str], list[str]]:
    """(module names, parameter names) the adapter wraps; an error naming the field when the family cannot take it."""
    if problems := adapter_problems(family, lora):
        raise UnsupportedFamilyError("; ".join(problems))
    return family.lora_targets(lora.target_modules)


def new_token_rows(tokenizer) -> dict[str, list[int]]:
    """Embedding and output rows of tokens added for the chat template: trained (peft trainable tokens), or the
    model could neither read nor write them."""
    ids = [i for i in getattr(tokenizer, "ftpipe_added_ids", []) if i != tokenizer.pad_token_id]
    return {"embed_tokens": ids, "lm_head": ids} if ids else {}
