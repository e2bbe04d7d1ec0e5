"""vLLM beside ftpipe: its own virtual environment (its pins differ from unsloth's), made by `ftpipe vllm-env`, and
`ftpipe check-artifact --vllm-python` running vLLM's own code on an artifact there (serving/vllm_check.py).

Without a GPU only the GPU kernels are left out of the environment (flashinfer, CUTLASS DSL, tilelang, ...): vLLM's
argument parser, engine config, tokenizer, renderer, generation config, model classes, weight loader and LoRA
loader all import and run with VLLM_TARGET_DEVICE=cpu; the engine does not, and nothing here starts it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

VLLM_VERSION = "0.33.0"
VLLM_PYTHON_ENV = "FTPIPE_VLLM_PYTHON"
CHECK_SCRIPT = Path(__file__).with_name("vllm_check.py")
# Requirements of the vllm wheel that are GPU kernels or media codecs: left out of a checking environment (--full keeps them).
GPU_ONLY = ("torchaudio", "torchvision", "torchcodec", "pynvvideocodec", "flashinfer-python", "apache-tvm-ffi", "tilelang",
            "nvidia-cudnn-frontend", "nvidia-cutlass-dsl", "nvtx", "fastsafetensors", "instanttensor", "quack-kernels",
            "tokenspeed-mla", "humming-kernels", "numba")


class ToolEnvError(RuntimeError):
    """A tool's own environment (vLLM's, llm-compressor's) could not be made or used."""


class VllmEnvError(ToolEnvError):
    pass


def vllm_python(explicit: str | None = None) -> str | None:
    """The vLLM environment's Python: --vllm-python, else $FTPIPE_VLLM_PYTHON, else none (vLLM checks are skipped)."""
    return tool_python(explicit, VLLM_PYTHON_ENV)


def tool_python(explicit: str | None, variable: str) -> str | None:
    """A tool environment's Python: the one given, else the environment variable's, else none; a relative path is
    taken from the working directory, as the shell would."""
    python = explicit or os.environ.get(variable) or None
    return str(Path(python).absolute()) if python and "/" in python else python


def create_env(target: Path, torch_spec: str | None = None, full: bool = False, pip_args: tuple[str, ...] = ()) -> Path:
    """A virtual environment at target with vllm==VLLM_VERSION; returns its Python. torch: the version ftpipe runs
    with (vLLM 0.33's model, loader and LoRA code run with it; pip finds it where ftpipe's came from), or torch_spec
    ("pinned": the version vLLM pins, a several-GB CUDA build where none is cached); full: every requirement, GPU
    kernels included (for `vllm serve` on a GPU machine)."""
    from importlib.metadata import PackageNotFoundError, version

    python = make_venv(target)
    run_pip(python, "install", "--no-deps", f"vllm=={VLLM_VERSION}", *pip_args)
    try:
        torch_spec = torch_spec or version("torch")
    except PackageNotFoundError:
        torch_spec = "pinned"
    wanted = wanted_requirements(_requirements(python), full, torch_spec)
    run_pip(python, "install", *wanted, *pip_args)
    imported = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                              env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    if imported.returncode != 0 or imported.stdout.strip() != VLLM_VERSION:
        raise VllmEnvError(f"{target}: vllm does not import: {imported.stderr.strip().splitlines()[-1:] or imported.stdout}")
    return python


def wanted_requirements(requirements: list[str], full: bool, torch_spec: str) -> list[str]:
    """vLLM's requirements to install: without the GPU kernels unless full, torch as torch_spec says ("pinned": as
    vLLM pins it; a version; or a specifier such as ">=2.14")."""
    wanted = [r for r in requirements if full or _name(r) not in GPU_ONLY]
    if torch_spec == "pinned":
        return wanted
    return [r for r in wanted if _name(r) != "torch"] + [f"torch{torch_spec if torch_spec[0] in '=<>~!' else '==' + torch_spec}"]


def make_venv(target: Path) -> Path:
    """A virtual environment with pip at target (kept if there); returns its Python."""
    venv.EnvBuilder(with_pip=True, clear=False).create(target)
    return target / "bin" / "python"


def run_pip(python: Path, *args: str) -> None:
    result = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args])
    if result.returncode != 0:
        raise ToolEnvError(f"pip {' '.join(args[:3])} ... failed (exit {result.returncode})")


def _requirements(python: Path) -> list[str]:
    """vllm's own requirements as its wheel states them, markers evaluated for this machine."""
    code = ("import json, importlib.metadata as m; from packaging.requirements import Requirement\n"
            "out = []\n"
            "for text in m.requires('vllm') or []:\n"
            "    r = Requirement(text)\n"
            "    if r.marker is None or r.marker.evaluate({'extra': ''}):\n"
            "        r.marker = None; out.append(str(r))\n"
            "print(json.dumps(out))")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        run_pip(python, "install", "packaging")
        result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def _name(requirement: str) -> str:
    """A requirement's project name, normalised (`PyNvVideoCodec==2.0.4` -> pynvvideocodec)."""
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group().lower().replace("_", "-")


def check_with_vllm(root: Path, python: str, conversations: list[dict] | None = None, timeout_s: int = 600) -> list[dict]:
    """vLLM's own verdict on an artifact, one dict per check ({check, ok, detail}); conversations: chat rows to
    render (default: probe conversations), each compared with the prompt ids the artifact's tokenizer encodes as
    training did."""
    request = vllm_request(root, conversations)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    answer = run_tool_script(python, CHECK_SCRIPT, request, "vLLM's checks", "ftpipe vllm-env PATH", timeout_s, VllmEnvError, env)
    if answer["vllm"] != VLLM_VERSION:
        answer["checks"].insert(0, {"check": "vLLM version", "ok": False,
                                    "detail": f"{python} has vLLM {answer['vllm']}; the launch files are for {VLLM_VERSION}"})
    return answer["checks"]


def run_tool_script(python: str, script: Path, request: dict, what: str, make: str, timeout_s: int,
                    error: type[Exception] = ToolEnvError, env: dict | None = None) -> dict:
    """Run one of ftpipe's standalone scripts in a tool's own environment: the request as JSON on stdin, the answer
    as JSON on the last line of stdout; anything else is `error` with the script's last words."""
    try:
        result = subprocess.run([python, str(script)], input=json.dumps(request), capture_output=True, text=True, timeout=timeout_s, env=env)
    except FileNotFoundError:
        raise error(f"{python}: no such program; make the environment with `{make}`") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what} did not finish in {timeout_s} s") from None
    if result.returncode != 0 or not result.stdout.strip():
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise error(f"{what} failed with {python} (exit {result.returncode}): {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


PROBES = [
    [{"role": "user", "content": "Where is my invoice for March?"}],
    [{"role": "system", "content": "You answer support tickets briefly."}, {"role": "user", "content": "My login fails."},
     {"role": "assistant", "content": "Reset your password from the sign-in page."}, {"role": "user", "content": "It still fails."}],
]


def vllm_request(root: Path, conversations: list[dict] | None) -> dict:
    """What vllm_check.py is asked: the model, the adapter and launch files, each prompt as training encoded it."""
    from serving.checks import launch_files
    from training.families import family_for
    from training.models import end_of_turn_token, load_saved_tokenizer
    from training.tokenize import encode_conversation, template_messages

    model_dir = root / "model"
    tokenizer = load_saved_tokenizer(model_dir)
    family = family_for(json.loads((model_dir / "config.json").read_text())["model_type"])
    prompts = []
    for row in conversations or [{"messages": [*p, {"role": "assistant", "content": "Done."}]} for p in PROBES]:
        messages = row["messages"]
        for example in encode_conversation(tokenizer, messages):
            turn = example.turn if example.turn is not None else max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append({"messages": template_messages(tokenizer, messages)[:turn], "prompt_ids": example.input_ids[: example.prompt_length]})
    end_of_turn = end_of_turn_token(tokenizer, family)
    served = launch_files(root)
    return {"model": str(model_dir.resolve()), "adapter": str((root / "adapter").resolve()) if (root / "adapter").is_dir() else None,
            "launch_files": {name: str((root / name).resolve()) for name in served},
            "models": {name: str((root / folder).resolve()) for name, folder in served.items() if folder != "model"},
            "conversations": prompts, "stop_ids": [tokenizer.convert_tokens_to_ids(end_of_turn)] if end_of_turn else []}


OPTIONS_FILE = Path(__file__).with_name("vllm_serve_options.json")
_OPTIONS_CODE = """
import json, vllm
from vllm.entrypoints.common.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser())
names = sorted({s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")})
print(json.dumps({"vllm": vllm.__version__, "options": names}))
"""


def serve_options(python: str) -> dict:
    """{vllm: version, options: [...]}: the option names the environment's `vllm serve` parser takes."""
    result = subprocess.run([python, "-c", _OPTIONS_CODE], capture_output=True, text=True, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    if result.returncode != 0:
        raise VllmEnvError(f"{python}: cannot read vLLM's serve options: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """`python -m serving.vllm_env PATH` makes an environment (as `ftpipe vllm-env PATH`); `--options PYTHON` rewrites
    serving/vllm_serve_options.json from that environment's vLLM (after changing the pinned version)."""
    if sys.argv[1] == "--options":
        options = serve_options(sys.argv[2])
        source = "the option names of `vllm serve` (vllm.entrypoints.common.cli_args.make_arg_parser), written by `python -m serving.vllm_env --options PYTHON`"
        OPTIONS_FILE.write_text(json.dumps({"vllm": options["vllm"], "source": source, "options": options["options"]}, indent=1) + "\n")
        return
    print(create_env(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
