"""Rows to trainer examples for every method, the settings and label checks trainers share, and SFT with trl's SFTTrainer."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from recipes.schema import TrainingSection
from data_prep.formats import conversation_of, kind_of
from data_prep.readers import DataError
from training.tokenize import (IGNORE, Encoded, MaskingError, check_end_of_turn_trained, check_trained_fraction, encode_chat,
                               encode_conversation, encode_text, final_turn_only)
from training.checkpoints import seal
from training.progress import PROGRESS_EVERY_S

log = logging.getLogger(__name__)

SAMPLE_ROWS = 16  # rows whose token ids export re-derives with the artifact's tokenizer


@dataclass
class TokenizedRows:
    examples: list[dict]
    sample: list[dict]  # [{messages, input_ids, prompt_length, turn}] as training saw them, one per example of a row
    dropped: int
    total_tokens: int
    trained_fraction: float
    truncated: int = 0
    whole_text: bool = False  # some rows carry a loss on every token (text rows, or training.loss_on=all)
    per_turn_rows: int = 0  # conversations the template rewrites, trained as one example per assistant turn
    rows: int = 0  # rows kept (each one example or more)


def tokenize_rows(tokenizer, rows: list[dict], training: TrainingSection, run_dir: Path, overlong: str = "drop") -> TokenizedRows:
    """Encode every row for the recipe's method; rows longer than max_seq_length are set aside with a reason
    (overlong=drop) or cut (overlong=truncate, the data recipe's choice); check the labels."""
    examples, sample, too_long = [], [], []
    trained = total = truncated = per_turn = 0
    whole_text = training.loss_on == "all"
    sampled_rows = 0
    for number, row in enumerate(rows, start=1):
        encodings = _encode(tokenizer, row, number, training)
        per_turn += training.method != "dpo" and len(encodings) > 1
        whole_text |= "text" in row
        longest = max(len(e.input_ids) for e in encodings)
        cut = False
        if longest > training.max_seq_length and overlong == "truncate":
            encodings = [Encoded(e.input_ids[: training.max_seq_length], e.labels[: training.max_seq_length], e.turn) for e in encodings]
            truncated += 1
            cut = True
        elif longest > training.max_seq_length:
            too_long.append({"row": number, "tokens": longest, "reason": f"longer than training.max_seq_length={training.max_seq_length}", **row})
            continue
        else:
            for encoded in encodings:
                check_end_of_turn_trained(encoded, tokenizer.eos_token_id, number)
        examples += _examples(encodings, training.method)
        if sampled_rows < SAMPLE_ROWS and "text" not in row and not cut:  # a cut row is not what the template renders
            sampled_rows += 1
            shown = encodings[:1] if training.method == "dpo" else encodings
            sample += [{"messages": conversation_of(row), "input_ids": e.input_ids, "prompt_length": e.prompt_length, "turn": e.turn}
                       for e in shown]
        trained += sum(e.trained_tokens for e in encodings)
        total += sum(len(e.input_ids) for e in encodings)
    if too_long:
        path = run_dir / "data_too_long.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in too_long))
        log.warning("%d rows longer than training.max_seq_length=%d were left out; listed in %s", len(too_long), training.max_seq_length, path)
    if not examples:
        raise MaskingError(f"no training rows fit training.max_seq_length={training.max_seq_length}")
    fraction = check_trained_fraction(trained, total, training.min_trained_token_fraction, upper_fraction(training, whole_text), "training data")
    if per_turn:
        log.info("the chat template rewrites earlier turns (history, system prompt or reasoning) in %d conversations: each of "
                 "their assistant turns is its own example, rendered as a server renders that step", per_turn)
    return TokenizedRows(examples, sample, len(too_long), total, round(fraction, 4), truncated, whole_text, per_turn,
                         len(rows) - len(too_long))


def _encode(tokenizer, row: dict, number: int, training: TrainingSection) -> list[Encoded]:
    """SFT: chat rows carry the loss on assistant turns (or everywhere with loss_on=all), text rows everywhere.
    DPO: the prompt followed by the chosen answer, and by the rejected one, each scored on that final answer."""
    if training.method == "dpo":
        if "chosen" not in row:
            raise DataError(f"train.jsonl row {number} is a {kind_of(row)} row; training.method=dpo trains on preference "
                            "rows ({prompt, chosen, rejected})")
        return [final_turn_only(encode_chat(tokenizer, row["prompt"] + row[answer])) for answer in ("chosen", "rejected")]
    if "text" in row:
        return [encode_text(tokenizer, row["text"])]
    if "messages" not in row:
        raise DataError(f"train.jsonl row {number} is a {kind_of(row)} row; training.method=sft trains on chat and text rows "
                        "(preference rows are for method: dpo)")
    encodings = encode_conversation(tokenizer, row["messages"])
    return [Encoded(e.input_ids, list(e.input_ids), e.turn) if training.loss_on == "all" else e for e in encodings]


def _examples(encodings: list[Encoded], method: str) -> list[dict]:
    """What the trainer reads: input_ids and labels per example (SFT), or trl's prompt_ids / chosen_ids /
    rejected_ids (DPO, one example of the chosen and the rejected encoding)."""
    if method != "dpo":
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in encodings]
    chosen, rejected = encodings
    start = chosen.prompt_length
    if chosen.input_ids[:start] != rejected.input_ids[:start]:
        raise MaskingError("the prompt tokenizes differently before the chosen and the rejected answer")
    return [{"prompt_ids": chosen.input_ids[:start], "chosen_ids": chosen.input_ids[start:], "rejected_ids": rejected.input_ids[start:]}]


def upper_fraction(training: TrainingSection, whole_text: bool) -> float:
    """The largest plausible share of trained tokens: with whole-text loss every token trains."""
    return 1.0 if whole_text else training.max_trained_token_fraction


@dataclass
class BatchStats:
    """Trained-token share of every batch the trainer sees: a silent masking bug shows up here."""

    low: float
    high: float
    fractions: list[float] = field(default_factory=list)
    tokens: int = 0

    def observe(self, inputs: dict) -> None:
        mask = trained_mask(inputs)
        real = inputs["attention_mask"].sum().item() if "attention_mask" in inputs else mask.numel()
        trained = mask.sum().item()
        self.tokens += int(real)
        self.fractions.append(check_trained_fraction(trained, real, self.low, self.high, f"training batch {len(self.fractions) + 1}"))

    def summary(self) -> dict | None:
        if not self.fractions:
            return None
        return {"batches": len(self.fractions), "min": round(min(self.fractions), 4), "max": round(max(self.fractions), 4),
                "mean": round(sum(self.fractions) / len(self.fractions), 4)}


def trained_mask(batch: dict):
    """Which positions of a collated batch carry a loss: labels set (SFT) or trl's completion mask (DPO)."""
    return batch["labels"] != IGNORE if "labels" in batch else batch["completion_mask"].bool()


def trainer_arguments(training: TrainingSection, run_dir: Path, report_to: list[str]) -> dict:
    """The Trainer settings every method shares: schedule, batch, checkpoints, logging, device."""
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,
        max_length=training.max_seq_length,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        report_to=report_to,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        disable_tqdm=True,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
    )


def trainer_callbacks(stats: BatchStats) -> list:
    """Loss lines for the log relay (training.progress reads them) and sealed checkpoints, for every method."""
    from transformers import TrainerCallback

    class LogLoss(TrainerCallback):
        """Logs every logging_steps, at least every PROGRESS_EVERY_S seconds in a one-process run (so a slow run's
        progress still moves), and the first and last steps, so a loss curve has its ends."""

        logged_at = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            # the time rule only in one process: logging gathers the loss from every process, which must all agree
            one_process = args is None or args.world_size == 1
            if (state.global_step == 1 or state.global_step >= state.max_steps
                    or (one_process and time.monotonic() - self.logged_at >= PROGRESS_EVERY_S)):
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:
                self.logged_at = time.monotonic()
                # every process sees batches of about this size: the total is this process's count times their number
                log.info("step %d/%d loss %.4f lr %.2e tokens %d", state.global_step, state.max_steps, logs["loss"],
                         logs.get("learning_rate", 0.0), stats.tokens * args.world_size)

    class SealCheckpoints(TrainerCallback):
        """Marks a checkpoint complete once the Trainer has written all of it (see training.checkpoints)."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                seal(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return [LogLoss(), SealCheckpoints()]


def build_trainer(model, tokenizer, dataset, training: TrainingSection, run_dir: Path, report_to: list[str], whole_text: bool = False):
    """The recipe method's trainer (SFT, or DPO from training.dpo) over the pre-tokenized dataset."""
    if training.method == "dpo":
        from training.dpo import build_dpo_trainer

        return build_dpo_trainer(model, tokenizer, dataset, training, run_dir, report_to)
    return build_sft_trainer(model, tokenizer, dataset, training, run_dir, report_to, whole_text)


def build_sft_trainer(model, tokenizer, dataset, training: TrainingSection, run_dir: Path, report_to: list[str], whole_text: bool = False):
    """An SFTTrainer over the pre-tokenized dataset, configured from the recipe's training section."""
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    stats = BatchStats(training.min_trained_token_fraction, upper_fraction(training, whole_text))

    class CheckedSFTTrainer(SFTTrainer):
        """Counts trained tokens per batch. Off GPU, trl's fused LM head (a Triton kernel) cannot run, so the
        loss is computed the plain transformers way there."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                stats.observe(inputs)
            if inputs["input_ids"].device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    config = SFTConfig(**trainer_arguments(training, run_dir, report_to), packing=training.packing)
    model.config.use_cache = False  # a KV cache in training forwards would also stop transformers from masking packed rows apart
    trainer = CheckedSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=trainer_callbacks(stats))
    return trainer, stats


def check_collated_batch(trainer, examples: list[dict], end_of_turn_id: int, training: TrainingSection) -> None:
    """Collate real rows the way the trainer will and check the end-of-turn token still carries a loss:
    a collator that masks pad ids would hide it when pad == eos. (DPO batches hold each row's chosen and
    rejected sequences; both must end with a trained end-of-turn.)"""
    batch = trainer.data_collator([{k: v for k, v in e.items()} for e in examples[: training.batch_size]])
    trained_end_of_turn = (batch["input_ids"] == end_of_turn_id) & trained_mask(batch)
    missing = [i for i in range(trained_end_of_turn.shape[0]) if not trained_end_of_turn[i].any()]
    if not training.packing and missing:
        raise MaskingError(
            f"after collation, rows {missing} have no label on the end-of-turn token (id {end_of_turn_id}): "
            "the collator masks it (pad == eos?), so the model would never stop"
        )
    if training.packing and not trained_end_of_turn.any():
        raise MaskingError(f"after packing, no end-of-turn token (id {end_of_turn_id}) carries a label")


PACKING_TOLERANCE = 1e-3


def check_packing_isolated(trainer, examples: list[dict]) -> float:
    """With packing, rows share a sequence: each must see only itself. Two rows are collated as the trainer
    packs them, and the second row's logits inside the pack are compared with its logits alone; a difference
    means attention crossed the row boundary. Returns the largest difference."""
    import torch

    batch = trainer.data_collator([dict(e) for e in examples[:2]])
    position_ids = batch.get("position_ids")
    if position_ids is None or batch["input_ids"].shape[0] != 1:
        raise MaskingError("training.packing: the trainer does not pack rows padding-free (no restarted positions for each "
                           "row), so packed rows would attend to each other or not be packed at all; use packing: false")
    ids, positions = batch["input_ids"][0], position_ids[0]
    start = int((positions == 0).nonzero().flatten()[1])  # where the second row begins
    model = trainer.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # no KV cache, as in training: transformers finds packed rows from position_ids only without one
            packed = model(input_ids=ids[None].to(device), position_ids=positions[None].to(device), use_cache=False).logits[0, start:]
            alone = model(input_ids=ids[None, start:].to(device), position_ids=positions[None, start:].to(device), use_cache=False).logits[0]
    finally:
        model.train(was_training)
    difference = float((packed.float() - alone.float()).abs().max())
    if difference > PACKING_TOLERANCE:
        raise MaskingError(
            f"training.packing: attention crosses packed row boundaries with attn_implementation="
            f"{model.config._attn_implementation!r} (a row's logits change by {difference:.3g} when packed after another); "
            "use packing: false"
        )
    return difference
