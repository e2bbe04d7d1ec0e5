"""training.distributed: processes launched through accelerate, DDP over gloo on CPU, and what cannot be launched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.schema import DistributedSection
from serving.checks import check_merged_model
from tests.conftest import run_ftpipe
from training.launch import launch_problems, worker_command

SHORT = ["--set", "training.max_steps=20", "--set", "evaluation.max_samples=20", "--set", "evaluation.gates=[]"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_two_process_ddp_run_trains_and_exports(tmp_path, backend):
    """`ftpipe run RECIPE --set training.distributed.num_processes=2`: accelerate starts two CPU processes in a gloo
    group; DDP keeps their weights equal, each reads half the data, and the usual artifact comes out."""
    result = run_ftpipe("run", "quickstart", "--set", "training.distributed.num_processes=2", "--set", f"training.backend={backend}",
                        *SHORT, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    trained = json.loads((artifact.parent / "training" / "result.json").read_text())
    assert trained["distributed"] == {"num_processes": 2, "strategy": "ddp", "model_wrapper": "DistributedDataParallel",
                                      "replica_max_difference": 0.0, "process_group": "gloo"}
    assert trained["steps"] == 20
    rows = trained["train_rows"]
    assert trained["epochs"] == pytest.approx(20 / -(-rows // (2 * 16)), abs=1e-3)  # the global batch is 2 x 16 rows
    assert trained["first_logged_loss"] > 2 * trained["final_logged_loss"]
    assert (artifact / "adapter" / "adapter_model.safetensors").is_file() and check_merged_model(artifact / "model") == []
    assert json.loads((artifact / "manifest.json").read_text())["merge"]["equivalence"]["passed"]


def test_one_process_runs_the_worker_itself_and_more_go_through_accelerate_launch(tmp_path):
    spec = tmp_path / "spec.json"
    assert worker_command(DistributedSection(), spec)[1:] == ["-m", "training.worker", str(spec)]
    command = worker_command(DistributedSection(num_processes=2), spec)
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert command[-4:] == ["--multi_gpu", "-m", "training.worker", str(spec)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharded_strategies_without_gpus_are_refused_before_any_work(tmp_path, strategy):
    """accelerate would quietly run fsdp on CPU processes as plain DDP (seen: the model came back wrapped in
    DistributedDataParallel), so the recipe is refused instead, naming the field."""
    problems = launch_problems(DistributedSection(num_processes=2, strategy=strategy))
    assert f"training.distributed.strategy={strategy} needs GPUs and this machine has none; use strategy: ddp" in " ".join(problems)
    result = run_ftpipe("run", "quickstart", "--set", f"training.distributed.strategy={strategy}",
                        "--set", "training.distributed.num_processes=2", "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "needs GPUs" in result.stderr
    assert not any(tmp_path.iterdir()), "nothing may run before the refusal"
    validated = run_ftpipe("validate", "quickstart", "--set", f"training.distributed.strategy={strategy}",
                           "--set", "training.distributed.num_processes=2")
    assert validated.returncode == 0 and "warning: on this machine, training.distributed.strategy" in validated.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_multi_gpu_strategies_train_and_export(tmp_path, strategy):
    result = run_ftpipe("run", "quickstart", "--set", f"training.distributed.strategy={strategy}",
                        "--set", "training.distributed.num_processes=2", *SHORT, "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    trained = json.loads((artifact.parent / "training" / "result.json").read_text())
    assert trained["distributed"]["process_group"] == "nccl" and trained["distributed"]["num_processes"] == 2
    assert check_merged_model(artifact / "model") == []


def test_the_gpu_work_pool_template_renders_one_gpu_or_a_node_of_eight():
    """The Kubernetes base job template shipped for GPU work pools, rendered by Prefect's own templating: every
    placeholder has a variable, and the gpus variable becomes the pod's nvidia.com/gpu limit."""
    import re

    from prefect.utilities.templating import apply_values

    template = json.loads((Path(__file__).resolve().parent.parent / "flows" / "k8s" / "gpu-base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), placeholders - set(variables)
    defaults = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    for gpus in (1, 8):
        rendered = apply_values(template["job_configuration"], {**defaults, "gpus": gpus, "image": "ftpipe-worker:1.0"})
        pod = rendered["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": gpus} and container["image"] == "ftpipe-worker:1.0"
        assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_training_summary_names_the_processes_and_the_dpo_rewards():
    from flows.reports import training_summary_markdown
    from training.models import BaseModelRef
    from training.train import TrainResult

    metrics = {"backend": "hf", "backend_reason": "requested", "device": "cpu", "method": "dpo", "steps": 20, "epochs": 0.6,
               "first_logged_loss": 0.69, "final_logged_loss": 0.3, "train_rows": 10, "dropped_rows": 0, "train_tokens": 100,
               "trained_token_fraction": 0.2, "tokens_per_s": 5.0, "runtime_s": 2.0, "wandb": None,
               "distributed": {"num_processes": 2, "strategy": "ddp", "process_group": "gloo", "replica_max_difference": 0.0},
               "preference": {"reward_accuracy": 0.94, "reward_margin": 1.2}}
    trained = TrainResult(BaseModelRef("tiny:llama", None, "/m", "llama"), "/a", "/s", metrics)
    markdown = training_summary_markdown("dpo-quickstart", trained, "lora", 16)
    assert "| processes | 2 (ddp, gloo, replicas differ by 0.0) |" in markdown
    assert "| DPO reward accuracy / margin (last logged) | 0.94 / 1.2 |" in markdown and "| method, adapter | dpo, lora r=16 |" in markdown
