"""What a run cost and what serving the model would cost: device-seconds per stage times the user's prices.

Prices are inputs (cost.prices in the recipe, or cost.price_file): ftpipe ships none, so a figure appears only
where the user stated a price, and a missing price is named instead of guessed.
"""
from __future__ import annotations

import functools
import json
import math
import resource
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path


from data_prep.files import atomic_write_json
from recipes.loader import RecipeError, read_yaml_file
from recipes.schema import CostSection, ServingCostSection

HOURS_A_MONTH = 730
CPU = "cpu"


class CostError(ValueError):
    pass


@dataclass
class StageUsage:
    stage: str
    wall_s: float
    cpu_s: float  # CPU time of the stage's thread and of the processes it ran (data workers, the training worker)
    gpu_s: float  # GPU-seconds: wall time times the GPUs the stage held


@dataclass
class UsageMeter:
    """Collects each stage's usage in one run; stages that came from the cache cost nothing this run."""

    stages: list[StageUsage] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def stage(self, name: str, gpus: int = 0, children: bool = False):
        """Measure the block as stage `name` holding `gpus` GPUs for its wall time. CPU time is this thread's, plus
        the child processes' when `children` (only stages that start and reap their own, run one at a time: with
        compare.parallel another thread's children would be counted too); a stage adds what it measured elsewhere
        (the training worker's own CPU time) to the yielded record's cpu_s."""
        wall, thread_cpu, child_cpu = time.perf_counter(), time.thread_time(), cpu_seconds(resource.RUSAGE_CHILDREN)
        record = StageUsage(name, 0.0, 0.0, 0.0)
        try:
            yield record
        finally:
            elapsed = time.perf_counter() - wall
            children_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - child_cpu if children else 0.0
            cpu = time.thread_time() - thread_cpu + children_cpu + record.cpu_s
            record.wall_s, record.cpu_s, record.gpu_s = round(elapsed, 3), round(cpu, 3), round(elapsed * gpus, 3)
            with self._lock:
                self.stages.append(record)

    def to_list(self) -> list[dict]:
        return [asdict(s) for s in self.stages]

    def ran(self, name: str) -> bool:
        return any(s.stage == name for s in self.stages)

    @contextmanager
    def active(self):
        """Stages measured with `stage_usage` inside this block (in this thread) are recorded here."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


_current: ContextVar[UsageMeter | None] = ContextVar("ftpipe_usage_meter", default=None)


@contextmanager
def stage_usage(name: str, gpus: int = 0, children: bool = False):
    """Measure a stage into the active meter (outside one, e.g. a stage called from a test, the record is dropped)."""
    meter = _current.get()
    if meter is None:
        yield StageUsage(name, 0.0, 0.0, 0.0)
        return
    with meter.stage(name, gpus, children) as record:
        yield record


def metered(name: str, gpus: int = 0, children: bool = False) -> Callable:
    """Decorate a stage function so that each run of it is measured (a cached stage does not run, so costs nothing);
    gpus is how many GPUs the stage holds where CUDA is available, children whether it runs worker processes."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def measured(*args, **kwargs):
            with stage_usage(name, gpus_in_use(gpus) if gpus else 0, children):
                return fn(*args, **kwargs)
        return measured
    return wrap


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU time so far of this process (all its threads), or of its reaped children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def gpus_in_use(requested: int = 1) -> int:
    """GPUs a stage holds: `requested` where CUDA is available, none on a CPU machine."""
    import torch

    return min(requested, torch.cuda.device_count()) if torch.cuda.is_available() else 0


def load_prices(section: CostSection) -> dict[str, float]:
    """The price list: cost.price_file (YAML or JSON mapping of device type to USD an hour), then cost.prices over it."""
    prices: dict[str, float] = {}
    if section.price_file is not None:
        path = Path(section.price_file)
        try:
            loaded = read_yaml_file(path, "price list")
        except OSError as exc:
            raise CostError(f"cost.price_file: cannot read {path}: {exc}") from None
        except RecipeError as exc:
            raise CostError(f"cost.price_file: cannot read {path}: {exc.lines[0].removeprefix(f'{path}: ')}") from None
        if not isinstance(loaded, dict):
            raise CostError(f"cost.price_file: {path} must hold a mapping of device type to USD an hour, e.g. 'h100: 3.0'")
        for key, value in loaded.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise CostError(f"cost.price_file: {path}: {key}: {value!r} is not a price (USD an hour, >= 0)")
            prices[str(key).lower()] = float(value)
    return prices | section.prices


def device_type(section: CostSection, prices: dict[str, float], device_name: str | None) -> str | None:
    """The prices key training GPUs cost by: cost.gpu_type, or the price-list key found in the GPU's name."""
    if section.gpu_type:
        return section.gpu_type.lower()
    if not device_name:
        return None
    name = device_name.lower().replace(" ", "").replace("-", "")
    matches = [key for key in prices if key != CPU and key.replace("-", "") in name]
    return max(matches, key=len) if matches else None


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def updated_ledger(path: Path, ran: list[dict]) -> list[dict]:
    """Every stage's usage for the artifact of one run folder: the stages that ran now (retries summed) replace what
    the folder's ledger recorded for them; cached stages keep the usage of the run that computed them here."""
    ledger = json.loads(path.read_text()) if path.is_file() else {}
    for stage in ledger.values():
        stage["this_run"] = False
    now: dict[str, dict] = {}
    for record in ran:
        total = now.setdefault(record["stage"], {"stage": record["stage"], "wall_s": 0.0, "cpu_s": 0.0, "gpu_s": 0.0, "this_run": True})
        for key in ("wall_s", "cpu_s", "gpu_s"):
            total[key] = round(total[key] + record[key], 3)
    ledger |= now
    atomic_write_json(path, ledger)
    return list(ledger.values())


def run_cost(stages: list[dict], section: CostSection, train_rows: int, device_name: str | None = None) -> dict:
    """Device-seconds and USD per stage, for the artifact and for this run (cached stages cost nothing now), and per
    1,000 training rows; a missing price is named, not guessed."""
    prices = load_prices(section)
    gpu_type = device_type(section, prices, device_name)
    missing = []
    if any(s["gpu_s"] for s in stages) and (gpu_type is None or gpu_type not in prices):
        missing.append(f"GPU-hours of {gpu_type or device_name or 'the GPU'} (cost.prices has no such key; set cost.gpu_type or add a price)")
    if any(s["cpu_s"] for s in stages) and CPU not in prices:
        missing.append("CPU-core hours (cost.prices.cpu)")
    rows = []
    for s in stages:
        usd = s["cpu_s"] / 3600 * prices.get(CPU, 0.0) + s["gpu_s"] / 3600 * prices.get(gpu_type or "", 0.0)
        rows.append({**s, "usd": round(usd, 6)})
    total = sum(r["usd"] for r in rows)
    this_run = sum(r["usd"] for r in rows if r.get("this_run", True))
    priced = not missing
    return {
        "stages": rows,
        "cpu_s": round(sum(s["cpu_s"] for s in stages), 3),
        "gpu_s": round(sum(s["gpu_s"] for s in stages), 3),
        "gpu_type": gpu_type,
        "device": device_name or "cpu",
        "prices_usd_per_hour": prices,
        "usd": round(total, 6) if priced else None,
        "usd_this_run": round(this_run, 6) if priced else None,
        "usd_per_1k_train_rows": round(total / train_rows * 1000, 6) if priced and train_rows else None,
        "unpriced": missing,
    }


def serving_projection(section: ServingCostSection, cost: CostSection, measured: dict | None) -> dict | None:
    """A month of self-hosted serving against the hosted API price, both from the user's figures; throughput is the
    stated one or the candidate's generation throughput measured in evaluation (which device it was measured on is
    said). None when no monthly volume is given."""
    if not section.requests_per_month:
        return None
    prices = load_prices(cost)
    gpu_type = (section.gpu_type or cost.gpu_type or "").lower() or None
    if section.tokens_per_s:
        throughput, source = section.tokens_per_s, "stated (cost.serving.tokens_per_s)"
    elif measured and measured.get("tokens_per_s"):
        throughput = measured["tokens_per_s"]
        source = (f"measured: the candidate's greedy generation in evaluation on {measured.get('device', '?')} "
                  "(transformers generate, not vLLM: a stated figure for the target GPU is better)")
    else:
        throughput, source = None, "none: set cost.serving.tokens_per_s"
    out_tokens = section.requests_per_month * section.completion_tokens
    in_tokens = section.requests_per_month * section.prompt_tokens
    result = {"requests_per_month": section.requests_per_month, "prompt_tokens": section.prompt_tokens,
              "completion_tokens": section.completion_tokens, "tokens_per_s": throughput, "throughput_source": source,
              "gpu_type": gpu_type, "unpriced": []}
    if throughput:
        busy_hours = out_tokens / throughput / 3600
        result["busy_gpu_hours"] = round(busy_hours, 2)
        result["billed_gpu_hours"] = round(max(busy_hours, section.min_replicas * HOURS_A_MONTH), 2)
    if gpu_type in prices and throughput:
        result["self_hosted_usd"] = round(result["billed_gpu_hours"] * prices[gpu_type], 2)
    else:
        result["unpriced"].append(f"serving GPU {gpu_type or '(cost.serving.gpu_type)'} has no price in cost.prices"
                                  if throughput else "no throughput")
    if section.api_usd_per_million_input_tokens is not None and section.api_usd_per_million_output_tokens is not None:
        result["api_usd"] = round(in_tokens / 1e6 * section.api_usd_per_million_input_tokens
                                  + out_tokens / 1e6 * section.api_usd_per_million_output_tokens, 2)
    else:
        result["unpriced"].append("hosted API prices (cost.serving.api_usd_per_million_input_tokens / _output_tokens)")
    if "self_hosted_usd" in result and "api_usd" in result:
        result["self_hosted_over_api"] = round(result["self_hosted_usd"] / result["api_usd"], 4) if result["api_usd"] else None
    return result


def cost_report(section: CostSection, ran: list[dict], run_dir: Path, train_rows: int, generation: dict | None,
                evaluation=None, objective: str | None = None) -> dict:
    """What the manifest, the model card and the Prefect artifact show: the cost of the run folder's artifact (its
    ledger, updated with the stages that ran now), the serving projection, and each contender's quality and price
    per 1,000 requests beside the candidate's (evaluation: the EvalResult; objective: the metric shown)."""
    stages = updated_ledger(Path(run_dir) / "usage.json", ran)
    serving = serving_projection(section.serving, section, generation)
    report = {"run": run_cost(stages, section, train_rows, gpu_name()), "serving": serving}
    if evaluation is not None and evaluation.contender_info:
        report["contenders"] = side_by_side(evaluation, objective, serving)
    return report


def contender_cost(info: dict, requests_per_month: int = 0) -> dict:
    """A contender's price from the token usage its server reported on the evaluation's requests: what the evaluation
    cost, the mean request, USD per 1,000 such requests and, given a monthly volume, a month of them."""
    usage = info["usage"]
    counted = usage["requests"] - usage["unreported"]
    prices = info.get("usd_per_million_input_tokens"), info.get("usd_per_million_output_tokens")
    out = {"requests": usage["requests"], "unreported_usage": usage["unreported"], "prompt_tokens": usage["prompt_tokens"],
           "completion_tokens": usage["completion_tokens"],
           "mean_prompt_tokens": round(usage["prompt_tokens"] / counted, 1) if counted else None,
           "mean_completion_tokens": round(usage["completion_tokens"] / counted, 1) if counted else None, "unpriced": []}
    if None in prices:
        out["unpriced"].append("the endpoint's prices (usd_per_million_input_tokens / _output_tokens)")
    if not counted:
        out["unpriced"].append("the server reported no token usage")
    if out["unpriced"]:
        return out
    usd = usage["prompt_tokens"] / 1e6 * prices[0] + usage["completion_tokens"] / 1e6 * prices[1]
    out |= {"usd_evaluation": round(usd, 6), "usd_per_1k_requests": round(usd / counted * 1000, 6)}
    if requests_per_month:
        out["usd_per_month"] = round(usd / counted * requests_per_month, 2)
    if usage["unreported"]:
        out["unpriced"].append(f"{usage['unreported']} replies without usage are not in the evaluation's cost")
    return out


def self_hosted_per_1k(serving: dict | None) -> float | None:
    """USD per 1,000 requests of the serving projection's month, where it is priced."""
    if not serving or "self_hosted_usd" not in serving or not serving["requests_per_month"]:
        return None
    return round(serving["self_hosted_usd"] / serving["requests_per_month"] * 1000, 6)


def side_by_side(evaluation, objective: str | None, serving: dict | None) -> dict:
    """Quality and cost per 1,000 requests for the candidate (self-hosted, from the serving projection) and each
    contender (from its reported tokens), and the projection's month against each contender's real token counts."""
    per_month = serving["requests_per_month"] if serving else 0
    rows = [{"model": "candidate (self-hosted)", "objective": evaluation.candidate.get(objective),
             "usd_per_1k_requests": self_hosted_per_1k(serving)}]
    for name, info in evaluation.contender_info.items():
        cost = contender_cost(info, per_month)
        row = {"model": name, "objective": evaluation.contenders[name].get(objective), "usd_per_1k_requests": cost.get("usd_per_1k_requests"),
               "objective_delta": evaluation.interval(name, objective), **cost}
        if serving and "self_hosted_usd" in serving and cost.get("usd_per_month"):
            row["self_hosted_over_contender"] = round(serving["self_hosted_usd"] / cost["usd_per_month"], 4)
        rows.append(row)
    return {"objective": objective, "rows": rows}


def cost_markdown(report: dict | None) -> str:
    """The cost section of the Prefect artifact and the model card."""
    if not report:
        return "- not measured"
    cost, serving = report["run"], report["serving"]
    money = (f"${cost['usd']:.4f} (spent by this run, the rest came from the cache: ${cost['usd_this_run']:.4f})"
             if cost["usd"] is not None else "not priced")
    per_k = f"${cost['usd_per_1k_train_rows']:.4f}" if cost.get("usd_per_1k_train_rows") is not None else "not priced"
    lines = [f"- device: {cost['device']}; {cost['cpu_s']:.1f} CPU-seconds, {cost['gpu_s']:.1f} GPU-seconds "
             f"({cost['gpu_type'] or 'no GPU price key'})",
             f"- the artifact: {money}; per 1,000 training rows: {per_k}",
             *(f"- not priced: {m}" for m in cost["unpriced"]),
             "", "| stage | wall s | CPU s | GPU s | USD | ran |", "|---|---|---|---|---|---|",
             *(f"| {s['stage']} | {s['wall_s']:.2f} | {s['cpu_s']:.2f} | {s['gpu_s']:.2f} | {s['usd']:.6f} | "
               f"{'this run' if s.get('this_run', True) else 'earlier (cached now)'} |" for s in cost["stages"])]
    if serving:
        lines += ["", f"Serving projection: {serving['requests_per_month']:,} requests a month of {serving['prompt_tokens']} prompt + "
                  f"{serving['completion_tokens']} generated tokens; throughput {serving['tokens_per_s']} tokens/s "
                  f"({serving['throughput_source']})"]
        if "billed_gpu_hours" in serving:
            lines.append(f"- self-hosted: {serving['busy_gpu_hours']} busy GPU-hours, {serving['billed_gpu_hours']} billed "
                         f"({serving['gpu_type']}): " + (f"${serving['self_hosted_usd']:,.2f}" if "self_hosted_usd" in serving else "not priced"))
        lines.append("- hosted API: " + (f"${serving['api_usd']:,.2f}" if "api_usd" in serving else "not priced"))
        if serving.get("self_hosted_over_api") is not None:
            lines.append(f"- self-hosted / API: {serving['self_hosted_over_api']:.2f}")
        lines += [f"- not priced: {m}" for m in serving["unpriced"]]
    if contenders := report.get("contenders"):
        lines += ["", _contender_table(contenders)]
    return "\n".join(lines)


def _contender_table(contenders: dict) -> str:
    """Quality and price per 1,000 requests, the candidate first; tokens are what each server reported."""
    from evaluation.confidence import describe

    objective = contenders["objective"]
    lines = [f"Against the hosted APIs ({objective} on the same rows; a contender's price from the tokens its server reported):", "",
             f"| model | {objective} | candidate minus it | USD per 1,000 requests | mean tokens in/out | a month at the stated volume |",
             "|---|---|---|---|---|---|"]
    for row in contenders["rows"]:
        value = "-" if row["objective"] is None else f"{row['objective']:.4f}"
        price = "not priced" if row["usd_per_1k_requests"] is None else f"${row['usd_per_1k_requests']:.4f}"
        tokens = f"{row['mean_prompt_tokens']}/{row['mean_completion_tokens']}" if "mean_prompt_tokens" in row else "-"
        month = f"${row['usd_per_month']:,.2f}" if row.get("usd_per_month") is not None else "-"
        if row.get("self_hosted_over_contender") is not None:
            month += f" (self-hosted / this: {row['self_hosted_over_contender']:.2f})"
        lines.append(f"| {row['model']} | {value} | {describe(row.get('objective_delta')) if 'objective_delta' in row else '-'} | "
                     f"{price} | {tokens} | {month} |")
    lines += [f"- {row['model']}: not priced: {m}" for row in contenders["rows"][1:] for m in row["unpriced"]]
    return "\n".join(lines)


