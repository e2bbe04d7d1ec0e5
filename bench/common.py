"""What the benchmarks share: the machine they ran on, the quickstart's prepared data and tiny base model, and
running two contenders alternately so drift on a shared machine hits both alike."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    """One line for RESULTS.md: cores, memory, accelerator, the library versions that set the speed."""
    import torch
    import transformers
    import trl

    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores, {memory_gb:.0f} GiB, {device}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}, Python {platform.python_version()}")


def prepared_quickstart(folder: Path, overrides: dict | None = None):
    """(recipe, prepared data, tiny base model) of the quickstart recipe, prepared into folder."""
    from data_prep.prepare import prepare_data
    from recipes.loader import resolve_recipe
    from training.train import filter_for_model, resolve_base_for

    recipe = resolve_recipe("quickstart", overrides)
    data = prepare_data(recipe.data, folder / "data")
    base = resolve_base_for(recipe.model, data)
    return recipe, filter_for_model(data, recipe.data, recipe.model, recipe.training, base), base


SHAPES = {
    # the sizes of the real configs (hidden, MLP, layers, heads, KV heads, vocabulary), embeddings untied
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=32000),
}


def random_model(tiny, shape: str, folder: Path):
    """(BaseModelRef, parameter count) of a random model of a named shape with the tiny model's tokenizer (ids above
    it are never used), built in a child process (this one stays small) and saved in bf16 as hub models are."""
    from training.models import BaseModelRef

    parameters = in_child(_build_random_model, tiny.path, SHAPES[shape], str(folder))["result"]
    return BaseModelRef(model_id=f"bench:{shape}", revision=None, path=str(folder), model_type=tiny.model_type), parameters


def _build_random_model(tiny_path: str, shape: dict, folder: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_path)
    for key, value in {**shape, "initializer_range": 0.02}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def alternate(contenders: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run each contender `repeats` times, taking turns, the order rotated each round (A B C, B C A, ...) so that
    none always goes first, and collect what each run returned."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            run = contenders[name]
            results[name].append(run(round_number))
            print(f"  round {round_number + 1} {name}: {json.dumps(results[name][-1])}", flush=True)
    return results


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


@contextlib.contextmanager
def prefect_server_process(home: Path, port_by: str = "option", **env_vars: str):
    """`prefect server start` on 127.0.0.1 with its own home (database, result storage); yields (api url, the env a
    client needs), stopped afterwards. port_by: "option" (`--port`, the server's environment holding PREFECT_API_URL),
    "setting" (PREFECT_SERVER_API_PORT, as the README tells a user) or "option alone" (`--port`, no PREFECT_API_URL:
    the case where the UI calls the wrong port)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false", **env_vars)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server_env = dict(env)
    if port_by == "setting":
        server_env["PREFECT_SERVER_API_PORT"] = str(port)
    else:
        command += ["--port", str(port)]
    if port_by != "option":
        server_env.pop("PREFECT_API_URL")
    log = (home / "server.log").open("w")
    server = subprocess.Popen(command, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f"{url}/health", server, 120, f"prefect server (log: {home / 'server.log'})")
        yield url, env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def postgres_bin() -> Path | None:
    """Where initdb lives (Debian links initdb into /usr/local/bin, not createdb), or None when not installed."""
    import glob
    import shutil

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return Path(found).resolve().parent if found else None


@contextlib.contextmanager
def postgres_cluster(bin_dir: Path):
    """A throwaway PostgreSQL on 127.0.0.1 (as the `postgres` user when run as root: initdb refuses root); yields
    (the asyncpg URL Prefect takes, a function running one SQL query), stopped and removed afterwards."""
    import pwd
    import shutil
    import tempfile

    user = "postgres" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="ftpipe-pg-"))  # not under pytest's folder, which only root may enter
    home.chmod(0o755)
    data = home / "data"
    data.mkdir()
    if user:
        os.chown(data, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    port = free_port()

    def pg(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(bin_dir / command[0]), *command[1:]], user=user, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    pg("initdb", "-D", str(data), "-A", "trust", "-U", "prefect")
    pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "start", "-o", f"-p {port} -h 127.0.0.1 -k {data}")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", lambda sql: pg(
            "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-d", "prefect", "-tAc", sql).stdout.strip()
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(home, ignore_errors=True)


def background(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A server-like command from the repository root, its output in `log`, in a session of its own for `stop`."""
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """End a `background` command and its children: SIGTERM, then SIGKILL after 30 s."""
    from training.launch import stop_process_group

    stop_process_group(process)


def api_response(method: str, url: str, attempts: int = 8, **kwargs) -> httpx.Response:
    """One Prefect REST call made as Prefect's own client makes it: a 503 is retried with backoff. Prefect's SQLite
    server answers 503 `Service Unavailable` when a write collides with another one (measured: 11 of 1,527
    create_flow_run calls in a minute while `ftpipe serve` polled); the README's curl retries the same way."""
    for attempt in range(attempts):
        response = httpx.request(method, url, timeout=60, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(min(0.25 * 2 ** attempt, 5))
    return response


def deployment_id(url: str, name: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The id of deployment `name` once `process` (ftpipe serve, prefect deploy) has registered it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = api_response("GET", f"{url}/deployments/name/{name}")
        if found.status_code == 200:
            return found.json()["id"]
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll a server's health URL until it answers 200; fail with its output if it exits first (evaluation.served's
    loop, which evaluation.serve uses too)."""
    from evaluation.served import wait_until_healthy as wait

    wait(url, server, timeout, what, lambda: server.stderr.read()[-3000:] if server.stderr else "")


def python_script(script: Path, *args: str, env: dict | None = None) -> dict:
    """Run a Python script in a fresh interpreter and read the JSON object it prints last, with the process's
    wall time seen from outside (interpreter start included) as process_s."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                            env=dict(os.environ, **(env or {})))
    if result.returncode != 0:
        sys.exit(f"{script.name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - started, 3)}


def verdict(ratio: float, target: float, at_least: bool) -> str:
    met = ratio >= target if at_least else ratio <= target
    return f"target {'>=' if at_least else '<='} {target}: {'met' if met else 'NOT met'}"


def in_child(fn: Callable, *args) -> dict:
    """Run fn(*args) in a fresh spawned process: its result, wall time and peak RSS (the process's own memory,
    not this one's)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, fn, args))
    process.start()
    outcome = queue.get()
    process.join()
    if "error" in outcome:
        sys.exit(f"{fn.__name__} failed in its process:\n{outcome['error']}")
    return outcome


def _child(queue, fn: Callable, args: tuple) -> None:
    import traceback

    started = time.perf_counter()
    try:
        result = fn(*args)
    except BaseException:
        queue.put({"error": traceback.format_exc()})
        return
    queue.put({"result": result, "wall_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; getrusage's ru_maxrss would carry over the
    parent's peak from before the spawn."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
