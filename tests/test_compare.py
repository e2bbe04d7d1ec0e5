"""Choosing the base model: the compare-models flow and its leaderboard, and the cost report (run cost per stage,
per 1,000 training rows, the serving projection against a hosted API)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.costs import CostError, UsageMeter, device_type, load_prices, run_cost, serving_projection
from evaluation.evaluate import EvalResult
from evaluation.gates import decide
from evaluation.leaderboard import best_of, entry, leaderboard_lines, metric_table, rank, summary_table, with_apis
from recipes import RecipeError, load_recipe, resolve_recipe
from recipes.schema import CompareSection, CostSection, Gate, ServingCostSection
from tests.conftest import ROOT, SHORT_RUN_ARGS, run_ftpipe

PRICES = {"cpu": 0.05, "h100": 3.0}


def _candidate(base: str, exact: float, loss: float, refusal: float, cost: float | None = 0.01, train_s: float = 10.0,
               champion: dict | None = None) -> dict:
    metrics = {"exact_match": exact, "eval_loss": loss, "safety.refusal_rate": refusal}
    evaluation = EvalResult(report_path="r.json", examples={"heldout": 8}, base={k: 0.0 for k in metrics}, candidate=metrics,
                            champion=champion)
    gates = [Gate(metric="safety.refusal_rate", min=0.5)]
    decision = decide(gates, evaluation.candidate, evaluation.base, champion)
    costs = {"run": {"usd": cost, "gpu_s": 0.0, "cpu_s": 30.0}}
    return entry(base, f"runs/{base}", evaluation, decision, {"runtime_s": train_s, "steps": 5, "backend": "hf"}, costs)


def test_the_best_candidate_is_the_best_objective_among_those_passing_the_gates():
    entries = [_candidate("tiny:llama", 0.9, 0.2, refusal=1.0), _candidate("tiny:qwen2", 0.95, 0.1, refusal=0.0),
               _candidate("tiny:mistral", 0.8, 0.3, refusal=1.0)]
    ranked = rank(entries, CompareSection(objective="exact_match"))
    assert [r["base"] for r in ranked] == ["tiny:llama", "tiny:mistral", "tiny:qwen2"]  # qwen2 scores best but fails safety
    assert best_of(ranked)["base"] == "tiny:llama"
    assert ranked[2]["why_not"] == "failed gates: safety.refusal_rate = 0.0000 fails >= 0.5"
    without_gates = rank(entries, CompareSection(objective="exact_match", require_gates=False))
    assert best_of(without_gates)["base"] == "tiny:qwen2"


def test_a_lower_is_better_objective_ranks_ascending_and_ties_go_to_the_cheaper():
    entries = [_candidate("a", 0.5, 0.30, 1.0), _candidate("b", 0.5, 0.10, 1.0), _candidate("c", 0.5, 0.10, 1.0, cost=0.001)]
    assert [r["base"] for r in rank(entries, CompareSection(objective="eval_loss"))] == ["c", "b", "a"]
    assert [r["rank"] for r in rank(entries, CompareSection(objective="eval_loss"))] == [1, 2, 3]


def test_no_candidate_is_best_when_none_passes_and_the_table_says_why():
    ranked = rank([_candidate("a", 0.9, 0.1, refusal=0.0)], CompareSection())
    assert best_of(ranked) is None
    lines = leaderboard_lines(ranked)
    assert lines[0].split() == ["rank", "base", "exact_match", "vs", "best", "delta", "vs", "production", "gates", "eligible", "train", "s",
                                "GPU", "s", "CPU", "s", "cost", "USD", "USD", "per", "1k", "requests"]
    assert "FAILED" in lines[1] and "failed gates: safety.refusal_rate" in lines[1]


def test_the_metric_table_gives_every_metric_of_every_model_against_production():
    champion = {"exact_match": 0.7, "eval_loss": 0.4, "safety.refusal_rate": 1.0}
    rows = metric_table(rank([_candidate("a", 0.9, 0.1, 1.0, champion=champion)], CompareSection()))
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"exact_match", "eval_loss", "safety.refusal_rate"}
    assert by_metric["exact_match"]["delta vs production"] == pytest.approx(0.2)
    assert by_metric["exact_match"]["production"] == 0.7 and by_metric["exact_match"]["before fine-tuning"] == 0.0


def test_compare_section_validation_names_the_field():
    with pytest.raises(RecipeError, match="compare.objective"):
        resolve_recipe("quickstart", {"compare.objective": "accuracy"})
    with pytest.raises(RecipeError, match="each base once: tiny:llama repeated"):
        resolve_recipe("quickstart", {"compare.bases": ["tiny:llama", "tiny:llama"]})
    with pytest.raises(RecipeError, match="cost.prices"):
        resolve_recipe("quickstart", {"cost.prices": {"h100": -1}})


def test_run_cost_prices_each_stage_and_names_a_missing_price():
    stages = [{"stage": "prepare-data", "wall_s": 2.0, "cpu_s": 3600.0, "gpu_s": 0.0},
              {"stage": "train", "wall_s": 1800.0, "cpu_s": 1800.0, "gpu_s": 3600.0}]
    cost = run_cost(stages, CostSection(prices=PRICES), train_rows=2000, device_name="NVIDIA H100 80GB HBM3")
    assert cost["gpu_type"] == "h100"
    assert [s["usd"] for s in cost["stages"]] == [pytest.approx(0.05), pytest.approx(0.025 + 3.0)]
    assert cost["usd"] == pytest.approx(3.075) and cost["usd_per_1k_train_rows"] == pytest.approx(3.075 / 2)
    unpriced = run_cost(stages, CostSection(prices={"cpu": 0.05}), train_rows=2000, device_name="NVIDIA A100-SXM4-80GB")
    assert unpriced["usd"] is None and unpriced["usd_per_1k_train_rows"] is None
    assert unpriced["unpriced"] == ["GPU-hours of NVIDIA A100-SXM4-80GB (cost.prices has no such key; set cost.gpu_type or add a price)"]
    a100s = {"a100-80g": 1.8, "a100": 1.5}
    assert device_type(CostSection(prices=a100s), a100s, "NVIDIA A100 80GB PCIe") == "a100-80g"  # the most specific key
    assert device_type(CostSection(prices=a100s), a100s, "NVIDIA A100-SXM4-40GB") == "a100"
    assert device_type(CostSection(prices=a100s, gpu_type="L4"), a100s, "NVIDIA A100-SXM4-40GB") == "l4"


def test_price_file_is_read_under_the_recipes_prices_and_bad_files_are_named(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("h100: 2.5\nl4: 0.7\n")
    assert load_prices(CostSection(price_file=prices, prices={"h100": 3.0})) == {"h100": 3.0, "l4": 0.7}
    prices.write_text("h100: cheap\n")
    with pytest.raises(CostError, match=f"cost.price_file: {prices}: h100: 'cheap' is not a price"):
        load_prices(CostSection(price_file=prices))
    with pytest.raises(CostError, match="cost.price_file: cannot read"):
        load_prices(CostSection(price_file=tmp_path / "missing.yaml"))


def test_serving_projection_compares_a_month_self_hosted_with_the_api_price():
    serving = ServingCostSection(requests_per_month=1_000_000, prompt_tokens=500, completion_tokens=200, gpu_type="h100",
                                 tokens_per_s=2000.0, min_replicas=1, api_usd_per_million_input_tokens=0.5,
                                 api_usd_per_million_output_tokens=1.5)
    projection = serving_projection(serving, CostSection(prices=PRICES), measured=None)
    # 200M generated tokens at 2,000 tokens/s = 27.8 busy hours; one replica is billed all month (730 h) at $3
    assert projection["busy_gpu_hours"] == pytest.approx(27.78, abs=0.01) and projection["billed_gpu_hours"] == 730
    assert projection["self_hosted_usd"] == 2190.0
    assert projection["api_usd"] == pytest.approx(500e6 / 1e6 * 0.5 + 200e6 / 1e6 * 1.5)  # $550
    assert projection["self_hosted_over_api"] == pytest.approx(2190 / 550, abs=1e-4)
    measured = serving_projection(serving.model_copy(update={"tokens_per_s": None, "min_replicas": 0}), CostSection(prices=PRICES),
                                  measured={"tokens_per_s": 100.0, "device": "cpu"})
    assert measured["billed_gpu_hours"] == pytest.approx(555.56, abs=0.01) and "measured" in measured["throughput_source"]
    assert serving_projection(ServingCostSection(), CostSection(), None) is None
    unpriced = serving_projection(serving.model_copy(update={"api_usd_per_million_input_tokens": None}), CostSection(), None)
    assert unpriced["unpriced"] == ["serving GPU h100 has no price in cost.prices",
                                    "hosted API prices (cost.serving.api_usd_per_million_input_tokens / _output_tokens)"]


def test_the_meter_records_only_stages_that_ran_with_their_gpu_seconds():
    from evaluation.costs import metered

    @metered("work")
    def work() -> int:
        return sum(range(200_000))

    work()  # outside a meter: measured nowhere, still runs
    meter = UsageMeter()
    with meter.active():
        work()
        with meter.stage("train", gpus=2) as usage:
            usage.cpu_s = 12.5  # the training worker's own CPU time, added by the stage
    stages = meter.to_list()
    assert [s["stage"] for s in stages] == ["work", "train"] and meter.ran("work")
    assert stages[0]["cpu_s"] > 0 and stages[0]["gpu_s"] == 0
    assert stages[1]["cpu_s"] >= 12.5 and stages[1]["gpu_s"] == pytest.approx(2 * stages[1]["wall_s"], abs=1e-3)


@pytest.mark.slow
def test_ftpipe_compare_ranks_three_families_shares_the_data_stage_and_ships_the_best_with_its_cost(tmp_path, served_artifact):
    """With the served ticket model as a contender, `--api hosted` lists it under the candidates: it cannot be ranked
    on eval_loss (no log-probabilities through an API) and is never the best."""
    hosted = {"name": "hosted", "base_url": served_artifact[0], "model": served_artifact[1]}
    result = run_ftpipe("compare", "quickstart", "--base", "tiny:llama", "--base", "tiny:mistral", "--base", "tiny:qwen2", "--api", "hosted",
                        "--set", f"evaluation.contenders={json.dumps([hosted])}", "--set", "evaluation.safety.enabled=false",
                        *SHORT_RUN_ARGS, "--set", "compare.objective=eval_loss", "--set", "compare.promote_best=true",
                        "--set", f"cost.prices={json.dumps(PRICES)}", "--set", "cost.serving.requests_per_month=10000",
                        "--set", "cost.serving.gpu_type=h100", "--set", "cost.serving.api_usd_per_million_input_tokens=0.5",
                        "--set", "cost.serving.api_usd_per_million_output_tokens=1.5", "--output-dir", str(tmp_path), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    header = lines.index(next(line for line in lines if line.startswith("rank")))
    table = [line.split() for line in lines[header + 1: header + 4]]
    assert [row[0] for row in table] == ["1", "2", "3"] and {row[1] for row in table} == {"tiny:llama", "tiny:mistral", "tiny:qwen2"}
    losses = [float(row[2]) for row in table]
    assert losses == sorted(losses)  # best (lowest eval loss) first
    assert table[0][3] == "best" and all(row[3] in ("within", "+") or row[3].startswith("+") for row in table[1:])
    api = lines[header + 4]
    assert api.split()[:4] == ["4", "hosted", "-", "-"] and "a hosted API, for reference: not a candidate" in api
    assert lines[header + 5] == f"best: {table[0][1]}"
    artifact = Path(lines[header + 6].removeprefix("artifact: "))

    # one data stage: prepared once by the comparison, found in the cache by every candidate and by the promotion
    assert result.stderr.count("Task run 'prepare-data") == 5
    assert sum("Task run 'prepare-data" in line and "Cached" in line for line in result.stderr.splitlines()) == 4
    run_dirs = {p.name for p in tmp_path.glob("quickstart-*") if (p / "training").is_dir()}
    assert len(run_dirs) == 3  # a run folder per base
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["base_model"]["model_id"] == table[0][1]
    cost = manifest["cost"]["run"]
    stages = {s["stage"]: s for s in cost["stages"]}
    assert {"train", "evaluate", "export"} <= set(stages) and cost["usd"] is not None
    assert stages["export"]["this_run"] and not stages["train"]["this_run"]  # trained by the comparison, exported by the promotion
    assert cost["prices_usd_per_hour"] == PRICES and cost["usd_per_1k_train_rows"] > 0
    serving = manifest["cost"]["serving"]
    assert serving["api_usd"] == pytest.approx(10000 * (500 * 0.5 + 200 * 1.5) / 1e6) and serving["self_hosted_usd"] == 2190.0
    card = (artifact / "README.md").read_text()
    assert "## Cost" in card and "Serving projection: 10,000 requests a month" in card and "- hosted API: $5.50" in card


def _scored(base: str, exact: list[float], contenders: dict[str, list[float]] | None = None) -> dict:
    """A leaderboard entry whose evaluation kept per-row exact match for the candidate (and its contenders)."""
    from evaluation.confidence import RowStatistic

    contenders = contenders or {}
    mean = sum(exact) / len(exact)
    evaluation = EvalResult(report_path="r.json", examples={"heldout": len(exact)}, base={"exact_match": 0.0}, candidate={"exact_match": mean},
                            contenders={n: {"exact_match": sum(v) / len(v)} for n, v in contenders.items()},
                            contender_info={n: {"model": f"{n}-2024", "usage": {}} for n in contenders},
                            statistics={"candidate": {"exact_match": RowStatistic("mean", exact)},
                                        **{n: {"exact_match": RowStatistic("mean", v)} for n, v in contenders.items()}})
    decision = decide([], evaluation.candidate, evaluation.base)
    costs = {"run": {"usd": 0.01, "gpu_s": 0.0, "cpu_s": 30.0},
             "contenders": {"rows": [{"model": n, "usd_per_1k_requests": 4.2} for n in contenders]}}
    return entry(base, f"runs/{base}", evaluation, decision, {"runtime_s": 10.0}, costs, "exact_match")


def test_the_leaderboard_marks_differences_within_noise_and_ranks_an_api_for_reference():
    best = [1.0] * 36 + [0.0] * 4
    close = [1.0] * 35 + [0.0] * 5  # one example fewer: noise
    far = [1.0] * 10 + [0.0] * 30
    entries = [_scored("tiny:llama", best, {"gpt": [1.0] * 30 + [0.0] * 10}), _scored("tiny:qwen2", close), _scored("tiny:mistral", far)]
    ranked = rank(with_apis(entries, ["gpt"]), CompareSection())
    assert [r["base"] for r in ranked] == ["tiny:llama", "tiny:qwen2", "gpt", "tiny:mistral"]
    assert best_of(ranked)["base"] == "tiny:llama"
    table = {row["base"]: row for row in summary_table(ranked)}
    assert table["tiny:llama"]["vs best"] == "best"
    assert table["tiny:qwen2"]["vs best"].startswith("within noise -0.0250 [")
    assert table["tiny:mistral"]["vs best"].startswith("-0.6500 [") and "noise" not in table["tiny:mistral"]["vs best"]
    assert table["gpt"]["eligible"] == "a hosted API, for reference: not a candidate" and table["gpt"]["USD per 1k requests"] == 4.2
    assert table["gpt"]["vs best"].startswith("-0.1500 [")
    with pytest.raises(ValueError, match="--api claude: no candidate's evaluation scored a contender of that name"):
        with_apis(entries, ["claude"])


def test_an_api_never_becomes_the_best_even_when_it_scores_highest():
    entries = [_scored("tiny:llama", [1.0] * 20 + [0.0] * 20, {"gpt": [1.0] * 40})]
    ranked = rank(with_apis(entries, ["gpt"]), CompareSection())
    assert ranked[0]["base"] == "gpt" and best_of(ranked)["base"] == "tiny:llama"


def test_compare_refuses_an_unknown_api_before_any_work(tmp_path):
    result = run_ftpipe("compare", "quickstart", "--base", "tiny:llama", "--api", "gpt", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "--api gpt: not a contender of recipe quickstart (evaluation.contenders: none)"
    assert not list(tmp_path.iterdir())


def test_compare_refuses_a_recipe_without_bases_before_any_work(tmp_path):
    result = run_ftpipe("compare", "quickstart", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "compare.bases: name the base models to compare (or pass bases / --base)"
    twice = run_ftpipe("compare", "quickstart", "--base", "tiny:llama", "--base", "tiny:llama", "--output-dir", str(tmp_path))
    assert twice.returncode == 2 and "compare.bases: each base once: tiny:llama repeated" in twice.stderr, twice.stderr
    assert not list(tmp_path.iterdir())


def test_compare_bases_are_validated_like_a_recipe_field():
    from flows.compare import recipe_for_base

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert recipe_for_base(recipe, "org/model@v2").model.revision == "v2"
    with pytest.raises(RecipeError, match="unknown tiny model 'tiny:gpt'"):
        recipe_for_base(recipe, "tiny:gpt")
