"""Export against a plain merge-and-save: time, bytes written per second and peak memory for the model's size.

    python bench/export.py [--shape llama-3.2-1b|small]

A random-initialised model shaped like Llama-3.2-1B (its config's sizes, untied 128,256-token embeddings; no
download) gets a LoRA adapter from one real training step of ftpipe's training stage. Then, each in its own
process so each peak RSS is its own: ftpipe's export (merge in float32, save bf16 shards, tokenizer and chat
template files, reload and compare logits with the adapter model, template check, adapter copy, checksums,
model card, artifact check) and a plain script (load bf16, PeftModel, merge_and_unload, save_pretrained).
Prints the ratio of bytes written per second last.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import SHAPES, in_child, machine, prepared_quickstart, random_model

def ftpipe_export(recipe, trained, eval_path: str, out_dir: str) -> dict:
    from evaluation.evaluate import EvalResult
    from evaluation.gates import decide
    from recipes import recipe_hash
    from serving.export import export_artifact

    lineage = {"name": "bench-export", "recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe_hash(recipe),
               "data": {"fingerprint": "bench"}, "max_seq_length": recipe.training.max_seq_length,
               "evaluation": EvalResult(report_path="not evaluated (export benchmark)", examples={}, base={}, candidate={}).to_dict(),
               "gates": decide([], {}, {}).to_dict()}
    artifact = export_artifact(recipe.export, recipe.model, trained, eval_path, lineage, out_dir)
    return {"bytes": folder_bytes(Path(artifact.path)), "equivalence": artifact.manifest["merge"]["equivalence"]["max_abs_logit_diff"]}


def plain_merge_and_save(base_path: str, adapter_path: str, out_dir: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapter_path).save_pretrained(out_dir)
    return {"bytes": folder_bytes(Path(out_dir))}


def libraries_only() -> dict:
    """What the libraries alone take once imported: subtracted to show the memory the work itself needs."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import serving.export  # noqa: F401
    return {"bytes": 0}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    args = parser.parse_args()
    print(machine())
    from training.train import train

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-export-") as tmp:
        folder = Path(tmp)
        recipe, data, tiny = prepared_quickstart(folder, {"training.max_steps": 1, "training.batch_size": 1, "training.backend": "hf"})
        base, parameters = random_model(tiny, args.shape, folder / "base")
        trained = train(recipe.training, recipe.model, recipe.tracking, data, folder / "train", base=base)
        ftpipe = in_child(ftpipe_export, recipe, trained, data.eval_path, str(folder / "ftpipe"))
        plain = in_child(plain_merge_and_save, base.path, trained.adapter_path, str(folder / "plain"))
        imports_mb = in_child(libraries_only)["peak_rss_mb"]
    size_mb = parameters * 2 / 1e6
    print(f"\nmodel: {args.shape}, {parameters / 1e9:.2f} B parameters, {size_mb:,.0f} MB in bf16 ({size_mb * 2:,.0f} MB float32)")
    print(f"peak RSS of a process that only imports the libraries: {imports_mb:,.0f} MB (the 'work' column subtracts it)")
    print(f"{'':<30} {'seconds':>8} {'MB written':>11} {'MB/s':>7} {'peak RSS MB':>12} {'work / bf16 size':>17}")
    for name, run in (("ftpipe export (all checks)", ftpipe), ("plain merge + save_pretrained", plain)):
        written = run["result"]["bytes"] / 1e6
        print(f"{name:<30} {run['wall_s']:>8.1f} {written:>11,.0f} {written / run['wall_s']:>7.1f} {run['peak_rss_mb']:>12,.0f} "
              f"{(run['peak_rss_mb'] - imports_mb) / size_mb:>17.2f}")
    print(f"merged bf16 vs adapter model: max |logit diff| {ftpipe['result']['equivalence']:.4f}")
    ratio = (ftpipe["result"]["bytes"] / ftpipe["wall_s"]) / (plain["result"]["bytes"] / plain["wall_s"])
    print(f"ftpipe export / plain merge+save, bytes written per second = {ratio:.3f}")


if __name__ == "__main__":
    main()
