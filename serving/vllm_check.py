"""vLLM's own code run on an artifact, in the Python of a vLLM environment (`ftpipe vllm-env`), on a machine with or
without a GPU (VLLM_TARGET_DEVICE=cpu): what `vllm serve` would do with the launch files up to the engine itself.

This file imports nothing of ftpipe (the vLLM environment has vLLM's pins, not ours): `serving/vllm_env.py` runs it
as `python vllm_check.py` with a JSON request on stdin and reads one JSON result from stdout:

    request: {"model": <merged model folder>, "adapter": <adapter folder or null>, "launch_files": {name: path},
              "models": {launch file name: its model folder, where not "model" (a quantized export)},
              "conversations": [{"messages": [...], "prompt_ids": [...]}], "stop_ids": [...]}
    result:  {"vllm": <version>, "checks": [{"check": <name>, "ok": bool, "detail": <one line>}]}
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main() -> None:
    request = json.loads(sys.stdin.read())
    import vllm

    checks: list[dict] = []
    with contextlib.redirect_stdout(sys.stderr):  # vLLM prints; stdout carries only the result
        run_checks(request, checks)
    print(json.dumps({"vllm": vllm.__version__, "checks": checks}))


def run_checks(request: dict, checks: list[dict]) -> None:
    engines, frontend = {}, {}
    models = request.get("models") or {}
    for name, path in request["launch_files"].items():
        model = models.get(name, request["model"])
        args = record(checks, f"{name}: vllm serve's argument parser", lambda path=path, model=model: parse_serve_args(model, path))
        if args is not None:
            frontend[name] = args
            engines[name] = record(checks, f"{name}: engine config (AsyncEngineArgs.create_engine_config)",
                                   lambda args=args: engine_config(args))
    for name in models:
        if engines.get(name) is not None:
            record(checks, f"{name}: quantized weights through vLLM's quantization method (DefaultModelLoader.load_weights)",
                   lambda config=engines[name]: load_quantized_weights(config))
    served = next((name for name, c in engines.items() if c is not None and name not in models), None)
    if served is None:
        return
    config = engines[served]
    tokenizer = record(checks, "tokenizer (vLLM's tokenizer registry)", lambda: tokenizer_of(config))
    if tokenizer is not None:
        defaults = getattr(frontend[served], "default_chat_template_kwargs", None) or {}
        record(checks, "chat template: the OpenAI server's renderer gives the prompt ids training used",
               lambda: compare_renders(config, tokenizer, request["conversations"], defaults))
        record(checks, "stop tokens: SamplingParams.update_from_generation_config stops at the end of turn",
               lambda: stop_tokens(config, tokenizer, request["stop_ids"]))
    record(checks, "weights: the model class built on the meta device takes every weight (DefaultModelLoader.load_weights)",
           lambda: load_weights(config))
    lora = engines.get("vllm-lora.yaml")
    if request.get("adapter") and lora is not None:
        record(checks, "adapter: PEFTHelper.validate_legal and LoRAModel.from_local_checkpoint",
               lambda: load_adapter(lora, request["adapter"]))


class NotCheckableHere(Exception):
    """vLLM has no kernel for this on the machine's platform (CPU): the check needs a GPU machine; not a verdict."""


def record(checks: list[dict], name: str, check):
    """Run one check; a raised error (or argparse's exit) is its failure, in one line."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            value = check()
    except NotCheckableHere as exc:
        checks.append({"check": name, "ok": True, "skipped": True, "detail": str(exc)})
        return None
    except SystemExit:
        message = [line for line in stderr.getvalue().splitlines() if line.strip()]
        checks.append({"check": name, "ok": False, "detail": (message[-1] if message else "exited").strip()})
        return None
    except Exception as exc:  # noqa: BLE001 - vLLM raises many types; each is this check's verdict
        detail = " ".join(str(exc).split())[:600] or type(exc).__name__
        checks.append({"check": name, "ok": False, "detail": f"{type(exc).__name__}: {detail}",
                       "trace": traceback.format_exc(limit=-3)})
        return None
    checks.append({"check": name, "ok": True, "detail": value if isinstance(value, str) else "ok"})
    return value if value is not None else True


def parse_serve_args(model: str, launch_file: str):
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    return parser.parse_args(["--model", model, "--config", launch_file])


def engine_config(args):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(args).create_engine_config()


def tokenizer_of(config):
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(config.model_config)


def compare_renders(config, tokenizer, conversations: list[dict], defaults: dict) -> str:
    """The prompt ids the chat endpoint builds for each conversation (a request as the OpenAI client sends it, the
    launch file's --default-chat-template-kwargs applied), against the ids training used for it."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.hf import HfRenderer

    renderer = HfRenderer(config, tokenizer)
    for i, item in enumerate(conversations):
        request = ChatCompletionRequest(model="check", messages=item["messages"])
        params = request.build_chat_params(None, "auto").with_defaults(defaults)
        _, prompt = renderer.render_messages(item["messages"], params)
        ids = prompt.get("prompt_token_ids")
        if ids is None:
            ids = tokenizer.encode(prompt["prompt"], add_special_tokens=False)
        if list(ids) != item["prompt_ids"]:
            first = next((k for k, (a, b) in enumerate(zip(ids, item["prompt_ids"])) if a != b), min(len(ids), len(item["prompt_ids"])))
            raise ValueError(f"conversation {i}: vLLM renders {len(ids)} prompt tokens, training used {len(item['prompt_ids'])}; "
                             f"first difference at token {first}")
    return f"{len(conversations)} conversations render to the same ids"


def stop_tokens(config, tokenizer, stop_ids: list[int]) -> str:
    from vllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=16)
    params.update_from_generation_config(config.model_config.try_get_generation_config(), tokenizer.eos_token_id)
    stops = {*(params.stop_token_ids or []), *params.all_stop_token_ids}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    missing = [i for i in stop_ids if i not in stops]
    if missing:
        raise ValueError(f"generation would not stop at token ids {missing} (vLLM stops at {sorted(stops)})")
    return f"stops at {sorted(stops)}"


def load_weights(config) -> str:
    """Build the model class vLLM resolved, on the meta device, and stream the checkpoint through its load_weights:
    a missing, renamed or misshapen weight fails as it would at `vllm serve`."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model

    import tempfile

    loader = get_model_loader(config.load_config)
    with set_current_vllm_config(config):
        if not model_parallel_is_initialized():  # one process, gloo: the layers ask for their tensor-parallel group
            rendezvous = os.path.join(tempfile.mkdtemp(prefix="vllm-check-"), "dist")
            init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{rendezvous}", backend="gloo")
            initialize_model_parallel(1, 1)
        with torch.device("cpu"):
            model = initialize_model(vllm_config=config)
        loader.load_weights(model, config.model_config)
    return f"{type(model).__name__}: all weights loaded"


def load_quantized_weights(config) -> str:
    """A quantized export: vLLM reads its quantization config (compressed-tensors), builds its quantized layers and
    loads the packed weights and scales into them."""
    from vllm.platforms import current_platform

    quantization = config.model_config.quantization
    if not quantization:
        raise ValueError("vLLM sees no quantization in config.json: it would load the folder as a 16-bit model")
    try:
        loaded = load_weights(config)
    except NotImplementedError as exc:
        if current_platform.is_cpu() and "MoE backend" in str(exc):  # kernels for quantized experts exist on GPUs only
            raise NotCheckableHere(f"needs a GPU machine: vLLM on CPU says {' '.join(str(exc).split())[:200]}") from None
        raise
    return f"{quantization}: {loaded}"


def load_adapter(config, adapter_dir: str) -> str:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(adapter_dir, config.model_config.max_model_len)
    helper.validate_legal(config.lora_config)
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
    model = LoRAModel.from_local_checkpoint(adapter_dir, expected, helper, device="cpu",
                                            model_vocab_size=config.model_config.get_vocab_size())
    return f"rank {helper.r}, {len(model.loras)} LoRA modules"


if __name__ == "__main__":
    main()
