"""The GPU set in one call: QLoRA and LoRA, unsloth and hf, on models shaped like Llama-3.2-1B and Llama-3.1-8B.

    python bench/gpu_train.py [--shapes llama-3.2-1b,llama-3.1-8b] [--adapters qlora,lora] [--backends unsloth,hf]
                              [--seq 2048] [--steps 10] [--batch 2] [--out DIR]

Models are random-initialised from the configs' sizes (no download) with the quickstart tokenizer; each runs
through ftpipe's training stage (its worker, label checks, packing isolation check) with packing on at the
given sequence length. For every run: tokens/s, model FLOPs utilisation (6 x parameters x tokens/s over the
card's bf16 matrix rate, both the rate measured here on random bf16 matrices and the datasheet's dense
peak) and peak GPU memory. Writes gpu_train.md and .json to --out (default $OUT) and prints, last, unsloth's
tokens/s and peak memory as ratios of hf's. Meant to finish within 10 minutes on one H100/H200.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import machine, prepared_quickstart, random_model

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, by the vendor's datasheets


def measured_bf16_tflops(size: int = 8192, repeats: int = 50) -> float | None:
    """The card's bf16 matrix rate on random square matrices, timed with CUDA events (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def datasheet_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in name), None)


def one_run(recipe, data, base, parameters: int, adapter: str, backend: str, args, folder: Path) -> dict:
    from training.train import train

    training = recipe.training.model_copy(update={
        "adapter": adapter, "backend": backend, "packing": args.packing, "max_seq_length": args.seq, "max_steps": args.steps,
        "batch_size": args.batch, "save_steps": 10_000, "logging_steps": 1, "learning_rate": 2e-4})
    started = time.perf_counter()
    result = train(training, recipe.model, recipe.tracking, data, folder / f"{base.model_id}-{adapter}-{backend}", base=base)
    m = result.metrics
    return {"shape": base.model_id, "adapter": adapter, "backend": m["backend"], "parameters": parameters, "steps": m["steps"],
            "tokens_per_s": m["tokens_per_s"], "peak_memory_mb": m["peak_memory_mb"]["mb"], "memory_of": m["peak_memory_mb"]["device"],
            "stage_s": round(time.perf_counter() - started, 1), "final_loss": m["final_logged_loss"]}


def with_utilisation(run: dict, measured: float | None, datasheet: float | None) -> dict:
    flops = 6 * run["parameters"] * run["tokens_per_s"] / 1e12
    return {**run, "model_tflops": round(flops, 2),
            "mfu_vs_measured": round(flops / measured, 4) if measured else None,
            "mfu_vs_datasheet": round(flops / datasheet, 4) if datasheet else None}


def table(runs: list[dict]) -> str:
    lines = ["| shape | adapter | backend | tokens/s | model TFLOP/s | MFU (measured peak) | MFU (datasheet) | peak memory MB | stage s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['adapter']} | {r['backend']} | {r['tokens_per_s']:,.0f} | {r['model_tflops']} | {r['mfu_vs_measured']} | "
              f"{r['mfu_vs_datasheet']} | {r['peak_memory_mb']:,.0f} ({r['memory_of']}) | {r['stage_s']} |" for r in runs]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--adapters", default="qlora,lora")
    parser.add_argument("--backends", default="unsloth,hf")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-packing", dest="packing", action="store_false", help="(for a CPU smoke run: unsloth does not pack on CPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    header = machine()
    print(header, flush=True)
    measured, datasheet = measured_bf16_tflops(), datasheet_tflops()
    print(f"bf16 matrix rate: measured {measured} TFLOP/s, datasheet {datasheet} TFLOP/s", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-gpu-") as tmp:
        folder = Path(tmp)
        recipe, data, tiny = prepared_quickstart(folder)
        for shape in args.shapes.split(","):
            base, parameters = random_model(tiny, shape, folder / shape)
            for adapter in args.adapters.split(","):
                for backend in args.backends.split(","):
                    runs.append(with_utilisation(one_run(recipe, data, base, parameters, adapter, backend, args, folder), measured, datasheet))
                    print(json.dumps(runs[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train.json").write_text(json.dumps({"machine": header, "measured_tflops": measured, "datasheet_tflops": datasheet,
                                                    "settings": vars(args), "runs": runs}, indent=2))
    (out / "gpu_train.md").write_text(f"{header}\n\n{table(runs)}\n")
    print(table(runs))
    for shape in args.shapes.split(","):
        for adapter in args.adapters.split(","):
            pair = {r["backend"]: r for r in runs if r["shape"] == f"bench:{shape}" and r["adapter"] == adapter}
            if {"unsloth", "hf"} <= pair.keys():
                print(f"{shape} {adapter}: unsloth / hf tokens/s = {pair['unsloth']['tokens_per_s'] / pair['hf']['tokens_per_s']:.2f} "
                      f"(target >= 1.5), peak memory = {pair['unsloth']['peak_memory_mb'] / pair['hf']['peak_memory_mb']:.2f} (target < 0.7)")


if __name__ == "__main__":
    main()
