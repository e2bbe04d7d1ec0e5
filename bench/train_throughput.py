"""ftpipe's training stage against a plain trl + peft script doing the same work, side by side.

    python bench/train_throughput.py [--rounds 3] [--epochs 1] [--backends hf,auto]

Same tiny Llama, same token ids (the quickstart's prepared rows, tokenized once by ftpipe and handed to the
plain script), same LoRA, sequence length, batch, schedule, checkpoint interval and seed. Runs take turns
(ftpipe, plain, ftpipe, ...). Throughput is every row's tokens times the epochs over the seconds of
trainer.train() on both sides; the stage's wall time (worker start, imports, model load, label checks,
training, adapter save) is shown beside the plain script's process time. Prints the ratio last.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import ROOT, alternate, machine, median_of, prepared_quickstart, python_script, verdict

TARGET = 0.97


def ftpipe_run(recipe, data, base, folder: Path):
    """One run of the training stage as the flow calls it (its worker process included)."""
    from training.train import train

    def run(round_number: int) -> dict:
        started = time.perf_counter()
        result = train(recipe.training, recipe.model, recipe.tracking, data, folder / f"round{round_number}", base=base)
        wall = time.perf_counter() - started
        m = result.metrics
        tokens = m["train_tokens"] * m["epochs"]
        return {"backend": m["backend"], "tokens": int(tokens), "train_s": m["runtime_s"], "tokens_per_s": round(tokens / m["runtime_s"], 1),
                "process_s": round(wall, 3), "steps": m["steps"], "train_loss": round(m["train_loss"], 5)}
    return run


def plain_run(recipe, data, base, folder: Path):
    """One run of the plain script (a fresh output folder per round), on ftpipe's tokenization of the same rows."""
    from data_prep.prepare import read_jsonl
    from training.backends import adapter_targets
    from training.models import load_tokenizer
    from training.sft import tokenize_rows

    training = recipe.training
    tokenizer = load_tokenizer(base, recipe.model)
    if getattr(tokenizer, "ftpipe_added_ids", None):
        raise SystemExit("the base model lacks template tokens; the plain script would train other weights")
    tokenizer.save_pretrained(folder / "tokenizer")
    examples = tokenize_rows(tokenizer, read_jsonl(data.train_path), training, folder, data.overlong).examples
    (folder / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    modules, _ = adapter_targets(base.family, training.lora)
    settings = {"model": base.path, "tokenizer": str(folder / "tokenizer"), "examples": str(folder / "examples.jsonl"),
                "r": training.lora.r, "alpha": training.lora.alpha, "target_modules": modules, "epochs": training.epochs,
                "max_steps": training.max_steps, "batch_size": training.batch_size, "learning_rate": training.learning_rate,
                "max_seq_length": training.max_seq_length, "seed": training.seed, "logging_steps": training.logging_steps,
                "save_steps": training.save_steps, "packing": training.packing}

    def run(round_number: int) -> dict:
        path = folder / f"plain{round_number}.json"
        path.write_text(json.dumps({**settings, "output_dir": str(folder / f"plain{round_number}")}))
        return python_script(ROOT / "bench" / "plain_trl.py", str(path))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--backends", default="hf,auto", help="ftpipe training.backend values to run (hf is like for like)")
    args = parser.parse_args()
    if "hf" not in args.backends.split(","):
        parser.error("--backends must include hf: the ratio compares like with like")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-train-") as tmp:
        folder = Path(tmp)
        recipe, data, base = prepared_quickstart(folder, {"training.epochs": args.epochs})
        contenders = {}
        for backend in args.backends.split(","):
            variant = recipe.model_copy(update={"training": recipe.training.model_copy(update={"backend": backend})})
            contenders[f"ftpipe ({backend})"] = ftpipe_run(variant, data, base, folder / f"ftpipe-{backend}")
        contenders["plain trl+peft"] = plain_run(recipe, data, base, folder)
        runs = alternate(contenders, args.rounds)
    plain = median_of(runs["plain trl+peft"], "tokens_per_s")
    print(f"\n{'contender':<22} {'tokens/s':>10} {'train s':>8} {'stage/process s':>16} {'loss':>8}")
    for name, results in runs.items():
        print(f"{name:<22} {median_of(results, 'tokens_per_s'):>10.0f} {median_of(results, 'train_s'):>8.2f} "
              f"{median_of(results, 'process_s'):>16.2f} {median_of(results, 'train_loss'):>8.4f}")
    for name, results in runs.items():
        if name != "plain trl+peft" and not name.endswith("(hf)"):
            print(f"{name} / plain tokens/s = {median_of(results, 'tokens_per_s') / plain:.3f}")
    ratio = median_of(runs["ftpipe (hf)"], "tokens_per_s") / plain
    print(f"ftpipe (hf) / plain trl+peft tokens/s = {ratio:.3f} ({verdict(ratio, TARGET, at_least=True)})")


if __name__ == "__main__":
    main()
