"""Direct preference optimisation with trl's DPOTrainer, on preference rows tokenized by training.sft.

The reference model is handled the way trl handles a peft model: no second copy of the base is loaded;
trl scores the reference with a frozen copy of the adapter as it was initialised (B = 0, so exactly the
base model).
"""
from __future__ import annotations

import logging
from pathlib import Path

from recipes.schema import TrainingSection
from training.sft import BatchStats, trainer_arguments, trainer_callbacks

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "ref"  # the frozen adapter copy trl adds to a peft model; never exported


def build_dpo_trainer(model, tokenizer, dataset, training: TrainingSection, run_dir: Path, report_to: list[str]):
    """A DPOTrainer over examples that already hold prompt_ids / chosen_ids / rejected_ids."""
    import torch
    from trl import DPOConfig, DPOTrainer

    if getattr(tokenizer, "ftpipe_added_ids", None) and [i for i in tokenizer.ftpipe_added_ids if i != tokenizer.pad_token_id]:
        from training.tokenize import MaskingError

        raise MaskingError("training.method=dpo: the base model's vocabulary lacks the chat template's tokens, and DPO cannot "
                           "train new lm_head rows; train with method: sft first and use its merged model as model.base")
    if not torch.cuda.is_available():
        use_plain_torch_log_probs()
    stats = BatchStats(training.min_trained_token_fraction, training.max_trained_token_fraction)

    class CheckedDPOTrainer(DPOTrainer):
        """Takes the rows as ftpipe tokenized them (the ids a server sees) and counts scored tokens per batch."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                stats.observe(inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    config = DPOConfig(**trainer_arguments(training, run_dir, report_to), beta=training.dpo.beta, loss_type=[training.dpo.loss_type])
    model.config.use_cache = False
    trainer = CheckedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=trainer_callbacks(stats))
    return trainer, stats


def preference_metrics(log_history: list[dict]) -> dict:
    """The last logged DPO statistics: how often the implicit reward prefers the chosen answer, and by how much."""
    wanted = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
              "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}
    last = next((entry for entry in reversed(log_history) if "rewards/accuracies" in entry), {})
    return {name: round(last[key], 4) for key, name in wanted.items() if key in last}


class PlainTorchLogProbs:
    """trl's fused LM-head slot (`_ChunkedLogProbFunction`) in plain torch ops on full logits.

    trl computes DPO log-probabilities with a Triton kernel, which cannot run without a GPU (the CUDA build of
    torch finds no Triton driver). unsloth fills the same slot with its own kernel; this is the CPU equivalent,
    with the same arguments and outputs (log-probs, entropy, log sum p^2, mean logit, target-is-argmax)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logits = logits / temperature
        log_z = torch.logsumexp(logits, dim=-1)
        target = logits.gather(-1, targets[:, None]).squeeze(-1)
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * log_z if "log_sum_sq_probs" in outputs else None
            mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
            is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
        return target - log_z, entropy, log_sum_sq, mean_logits, is_top1


def use_plain_torch_log_probs() -> None:
    import trl.trainer.utils

    trl.trainer.utils._ChunkedLogProbFunction = PlainTorchLogProbs
