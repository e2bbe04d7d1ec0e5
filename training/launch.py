"""How the training worker is started: one process, or `accelerate launch` for training.distributed.

accelerate owns the process group: DDP, FSDP and DeepSpeed ZeRO run on its launchers (torchrun underneath),
never on a home-made one. Each process runs `training.worker`; rank 0 writes the adapter and the result.
"""
from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

from recipes.schema import DistributedSection

WORKER = ["-m", "training.worker"]
STRATEGY_FLAGS = {
    # --multi_gpu selects accelerate's torchrun launcher; without GPUs the processes join a gloo group instead
    # (the worker passes use_cpu to the Trainer, and accelerate picks MULTI_CPU with gloo).
    "ddp": ["--multi_gpu"],
    "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
             "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"],
    "deepspeed_zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "deepspeed_zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model", "true",
                        "--zero3_init_flag", "false"],
}


class LaunchError(RuntimeError):
    """training.distributed asks for something this machine cannot start."""


def worker_command(distributed: DistributedSection, spec_path: Path) -> list[str]:
    """The command that trains: the worker itself, or accelerate launching one worker per process."""
    if distributed.num_processes == 1:
        return [sys.executable, *WORKER, str(spec_path)]
    if problems := launch_problems(distributed):
        raise LaunchError("; ".join(problems))
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(distributed.num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *STRATEGY_FLAGS[distributed.strategy], *WORKER, str(spec_path)]


def launch_problems(distributed: DistributedSection) -> list[str]:
    """What stops this machine from launching the recipe's processes (checked by `ftpipe validate` too)."""
    import torch

    if distributed.num_processes == 1:
        return []
    problems = []
    gpus = torch.cuda.device_count()
    if distributed.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(f"training.distributed.strategy={distributed.strategy} needs the deepspeed package (pip install deepspeed)")
    if distributed.strategy != "ddp" and not gpus:
        problems.append(f"training.distributed.strategy={distributed.strategy} needs GPUs and this machine has none; "
                        "use strategy: ddp (CPU processes over gloo)")
    if gpus and distributed.num_processes > gpus:
        problems.append(f"training.distributed.num_processes={distributed.num_processes} but this machine has {gpus} GPU(s)")
    return problems


def free_port() -> int:
    """A free loopback port for the process group's rendezvous (29500, torch's default, may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process) -> None:
    """End a process started in a session of its own (start_new_session) and its children: SIGTERM, SIGKILL after 30 s."""
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def rank() -> int:
    """This process's rank under accelerate/torchrun (0 when training in one process)."""
    import os

    return int(os.environ.get("RANK", "0"))
