"""llm-compressor run on a merged model, in the Python of the quantize environment (`ftpipe quantize-env`).

This file imports nothing of ftpipe (that environment has llm-compressor's pins, not ours): `serving/quantize.py` runs
it as `python quantize_script.py` with a JSON request on stdin and reads one JSON result from stdout:

    request: {"model": <merged 16-bit model folder>, "out": <folder to write>, "scheme": "FP8_DYNAMIC" | "W4A16"}
    result:  {"llmcompressor": <version>, "compressed_tensors": <version>, "format": <compressed-tensors format>,
              "ignored": [...], "seconds": <float>}

Both schemes are data-free (weights only are calibrated; FP8_DYNAMIC scales activations per token at run time),
so no calibration rows leave the run. lm_head stays 16-bit, as vLLM's examples keep it.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path


def main() -> None:
    request = json.loads(sys.stdin.read())
    with contextlib.redirect_stdout(sys.stderr):  # llm-compressor prints; stdout carries only the result
        result = quantize(request["model"], request["out"], request["scheme"])
    print(json.dumps(result))


def quantize(model_dir: str, out_dir: str, scheme: str) -> dict:
    from importlib.metadata import version

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    ignore = ["lm_head", r"re:.*\.gate$", "re:.*shared_expert_gate$"]  # and mixture-of-experts routers, as vLLM loads them
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore))
    model.save_pretrained(out_dir, save_compressed=True)
    quantization = json.loads((Path(out_dir) / "config.json").read_text())["quantization_config"]
    return {"llmcompressor": version("llmcompressor"), "compressed_tensors": version("compressed-tensors"),
            "format": quantization.get("format"), "ignored": ignore, "seconds": round(time.perf_counter() - started, 2)}


if __name__ == "__main__":
    main()
