"""Packing against padding: how much of each training batch is real tokens, and proof that the loss is the same.

    python bench/packing.py [--long-tail-rows 600]

Two datasets: the quickstart's prepared rows, and a long-tailed one (answer lengths drawn from a log-normal,
most short, a few near max_seq_length). For each, the trainer ftpipe builds (build_sft_trainer) is made with
packing off and on, and every batch of one epoch is counted: real tokens over the token slots the model
computes (padding included), the fill of packed bins (real tokens over bins x max_seq_length) and optimizer
steps. Then the untrained model's loss over all trained tokens of the epoch, with padded and with packed
batches: the same labels and isolated attention give the same loss. Prints the smallest packed fraction last.
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
from pathlib import Path

from common import machine, prepared_quickstart, verdict

TARGET = 0.95
LOSS_TOLERANCE = 1e-3  # relative


def long_tailed_rows(sample: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Chat rows like the sample's, with answers of log-normal length (median ~12 words, a long tail)."""
    rng = random.Random(seed)
    words = " ".join(m["content"] for row in sample[:200] for m in row["messages"]).split()
    rows = []
    for _ in range(n):
        length = max(1, min(150, int(rng.lognormvariate(math.log(12), 1.0))))
        prompt = rng.choice(sample)["messages"][:2]
        rows.append({"messages": [*prompt, {"role": "assistant", "content": " ".join(rng.choices(words, k=length))}]})
    return rows


def batch_counts(trainer) -> dict:
    """Real tokens, token slots and batches over one epoch of the trainer's own dataloader, and the rows the
    trainer's dataset holds (packed bins when packing)."""
    real = slots = batches = 0
    for batch in trainer.get_train_dataloader():
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real_here = int(mask.sum()) if mask is not None else int(ids.numel())
        real += real_here
        slots += ids.numel()
        batches += 1
    return {"real": real, "slots": slots, "rows_or_bins": len(trainer.train_dataset), "batches": batches}


def epoch_loss(trainer) -> tuple[float, int]:
    """Mean next-token loss over every trained token of one epoch (the sum over batches, not a mean of means),
    and how many tokens carried it."""
    import torch

    from training.tokenize import IGNORE

    model = trainer.model
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            logits = model(**inputs, use_cache=False).logits.float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            total += float(losses.sum())
            count += int((labels != IGNORE).sum())
    return total / count, count


def measure(name: str, rows: list[dict], recipe, base, folder: Path) -> dict:
    from datasets import Dataset

    from training.backends import load_hf
    from training.models import load_tokenizer
    from training.sft import build_sft_trainer, tokenize_rows

    tokenizer = load_tokenizer(base, recipe.model)
    results = {}
    for packing in (False, True):
        training = recipe.training.model_copy(update={"packing": packing, "backend": "hf"})
        tokenized = tokenize_rows(tokenizer, rows, training, folder)
        model = load_hf(base, training, False, tokenizer)
        trainer, _ = build_sft_trainer(model, tokenizer, Dataset.from_list(tokenized.examples), training, folder / f"{name}-{packing}", [])
        counts = batch_counts(trainer)
        loss, trained = epoch_loss(trainer)
        results[packing] = {**counts, "fraction": counts["real"] / counts["slots"], "loss": loss, "trained_tokens": trained,
                            "bin_fill": counts["real"] / (counts["rows_or_bins"] * training.max_seq_length) if packing else None}
    off, on = results[False], results[True]
    difference = abs(on["loss"] - off["loss"]) / off["loss"]
    print(f"\n{name}: {len(rows)} rows, {off['real']:,} tokens, max_seq_length {recipe.training.max_seq_length}, batch {recipe.training.batch_size}")
    print(f"  packing off: real/slots {off['fraction']:.3f}, {off['batches']} steps an epoch")
    print(f"  packing on:  real/slots {on['fraction']:.3f}, {on['batches']} steps an epoch "
          f"({off['batches'] / on['batches']:.1f}x fewer), {on['rows_or_bins']} bins filled {on['bin_fill']:.3f}")
    print(f"  loss over the epoch's trained tokens: off {off['loss']:.5f} ({off['trained_tokens']:,} tokens), "
          f"on {on['loss']:.5f} ({on['trained_tokens']:,} tokens), relative difference {difference:.2e} "
          f"({'same' if difference <= LOSS_TOLERANCE and off['trained_tokens'] == on['trained_tokens'] else 'DIFFERENT'})")
    return {"fraction_off": off["fraction"], "fraction_on": on["fraction"], "loss_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-tail-rows", type=int, default=600)
    args = parser.parse_args()
    print(machine())
    import datasets
    import transformers

    from data_prep.prepare import read_jsonl

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-packing-") as tmp:
        folder = Path(tmp)
        recipe, data, base = prepared_quickstart(folder)
        sample = read_jsonl(data.train_path)
        found = [measure("sample data (quickstart)", sample, recipe, base, folder),
                 measure("long-tailed lengths", long_tailed_rows(sample, args.long_tail_rows), recipe, base, folder)]
    smallest = min(f["fraction_on"] for f in found)
    print(f"\nreal-token fraction with packing, smallest of the two = {smallest:.3f} ({verdict(smallest, TARGET, at_least=True)})")


if __name__ == "__main__":
    main()
