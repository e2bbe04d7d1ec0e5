"""Evaluating against endpoints: OpenAI-compatible contenders, the LLM judge, paired bootstrap intervals, and what a
flaky network does to them. The servers are real: `transformers serve` on loopback serving trained tiny models, and a
proxy in front of it that answers 429/500, stalls or is down on purpose."""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from evaluation.confidence import RowStatistic, interval, within_noise
from evaluation.endpoints import EndpointClient, EndpointRefused, EndpointUnavailable
from evaluation.gates import decide
from evaluation.judge import Judge, combined_outcome, pairwise_verdict, rubric_verdict
from recipes import RecipeError, resolve_recipe
from recipes.schema import EndpointSection, Gate, JudgeSection
from tests.conftest import free_port, read_rows, write_jsonl

# --- intervals -----------------------------------------------------------------------------------------------------


def test_a_paired_interval_is_zero_wide_for_the_same_answers_and_excludes_zero_for_a_real_gain():
    same = RowStatistic("mean", [1.0, 0.0] * 20)
    assert interval(same, same, 0.95, 1000, 0)["low"] == interval(same, same, 0.95, 1000, 0)["high"] == 0.0
    better = RowStatistic("mean", [1.0] * 36 + [0.0] * 4)
    worse = RowStatistic("mean", [1.0] * 8 + [0.0] * 32)
    found = interval(better, worse, 0.95, 1000, 0)
    assert found["value"] == pytest.approx(0.7) and 0.5 < found["low"] < 0.7 < found["high"] <= 0.9
    assert not within_noise(found) and found == interval(better, worse, 0.95, 1000, 0)  # seeded: reproducible


def test_two_examples_of_forty_are_within_noise():
    """The issue's case: a 0.05 delta on 40 rows is two examples; the interval says so."""
    candidate = RowStatistic("mean", [1.0] * 22 + [0.0] * 18)
    base = RowStatistic("mean", [1.0] * 20 + [0.0] * 20)
    found = interval(candidate, base, 0.95, 2000, 0)
    assert found["value"] == pytest.approx(0.05) and within_noise(found)


def test_ratio_and_corpus_metrics_are_recomputed_per_resample_not_averaged_per_row():
    """eval_loss is token-weighted: a long row weighs more. Resampling must recompute the ratio."""
    loss = RowStatistic("ratio", [10.0, 1.0], [10.0, 1.0])  # 1.0 per token in both rows
    assert loss.value() == pytest.approx(1.0)
    assert loss.on(np.array([[0, 0], [1, 1], [0, 1]])).tolist() == pytest.approx([1.0, 1.0, 1.0])
    skewed = RowStatistic("ratio", [20.0, 1.0], [10.0, 1.0])
    assert skewed.value() == pytest.approx(21 / 11)  # not the mean of per-row losses (1.5)
    assert RowStatistic("ratio", [2.0], [1.0], "exp").value() == pytest.approx(math.exp(2.0))
    f1 = RowStatistic("corpus", metric="label_macro_f1", outputs=["a", "b", "a"], references=["a", "b", "b"])
    assert 0 < f1.value() < 1 and f1.on(np.array([[0, 1], [2, 2]])).shape == (2,)


def test_unscored_rows_are_left_out_not_counted_as_zero():
    judged = RowStatistic("mean", [1.0, math.nan, 0.0, 1.0])
    assert judged.value() == pytest.approx(2 / 3)


def test_models_scored_on_different_rows_get_no_interval():
    assert interval(RowStatistic("mean", [1.0, 0.0]), RowStatistic("mean", [1.0]), 0.95, 100, 0) is None


# --- gates on intervals ----------------------------------------------------------------------------------------------


def _gate_inputs(candidate_rows: list[float], base_rows: list[float]):
    candidate, base = RowStatistic("mean", candidate_rows), RowStatistic("mean", base_rows)

    def interval_of(versus, metric, confidence):
        return interval(candidate, base if versus else None, confidence, 1000, 0)

    return {"exact_match": candidate.value()}, {"exact_match": base.value()}, interval_of


def test_a_gate_with_confidence_needs_the_interval_bound_past_the_threshold_not_the_point():
    candidate, base, interval_of = _gate_inputs([1.0] * 24 + [0.0] * 16, [1.0] * 20 + [0.0] * 20)  # +0.10 on 40 rows
    point = Gate(metric="exact_match", min_delta_vs_base=0.05)
    assert decide([point], candidate, base, None, interval_of).passed  # the point delta passes
    sure = Gate(metric="exact_match", min_delta_vs_base=0.05, confidence=0.95)
    result = decide([sure], candidate, base, None, interval_of).results[0]
    assert not result.passed and result.interval["low"] < 0.05 < result.interval["value"]
    assert result.describe().startswith("exact_match - base = 0.1000, 95% interval [") and "its lower bound" in result.describe()
    clear, clear_base, clear_interval = _gate_inputs([1.0] * 38 + [0.0] * 2, [1.0] * 8 + [0.0] * 32)
    assert decide([sure], clear, clear_base, None, clear_interval).passed


def test_a_gate_with_confidence_fails_when_no_interval_can_be_computed():
    result = decide([Gate(metric="exact_match", min=0.5, confidence=0.9)], {"exact_match": 1.0}, {"exact_match": 0.0}).results[0]
    assert not result.passed and "no 90% interval" in result.describe()


def test_a_maximum_compares_the_upper_bound():
    """A point delta of +0.025 meets `at most +0.1`; with the models disagreeing on most rows, the interval's upper
    bound does not."""
    candidate, base, interval_of = _gate_inputs([1.0] * 21 + [0.0] * 19, [0.0] * 20 + [1.0] * 20)
    assert decide([Gate(metric="exact_match", max_delta_vs_base=0.1)], candidate, base, None, interval_of).passed
    gate = Gate(metric="exact_match", max_delta_vs_base=0.1, confidence=0.95)
    result = decide([gate], candidate, base, None, interval_of).results[0]
    assert result.value == result.interval["high"] and result.value > 0.1 and not result.passed


def test_a_run_cannot_drop_or_narrow_the_confidence_a_policy_gate_demands():
    """Adversarial: the policy wants the delta beyond noise at 95%; a recipe with the same gate at its point value,
    or at 60%, is refused before any work, and the policy's gate is applied anyway."""
    from governance.policy import Policy, run_gates, weakening

    mandatory = Gate(metric="exact_match", min_delta_vs_base=0.05, confidence=0.95)
    policy = Policy(require_approval=False, gates=[mandatory])
    for loose in ({}, {"confidence": 0.6}):
        recipe = resolve_recipe("quickstart", {"evaluation.gates": [{"metric": "exact_match", "min_delta_vs_base": 0.05, **loose}]})
        assert any("looser than the mandatory gate exact_match min_delta_vs_base 0.05 at 0.95 confidence" in p
                   for p in weakening(recipe, policy, "the registry"))
        assert mandatory in run_gates(recipe.evaluation.gates, policy)
    stricter = resolve_recipe("quickstart", {"evaluation.gates": [{"metric": "exact_match", "min_delta_vs_base": 0.05, "confidence": 0.99}]})
    assert weakening(stricter, policy, "the registry") == []


# --- the judge's verdicts --------------------------------------------------------------------------------------------


def test_verdicts_are_read_never_guessed():
    assert pairwise_verdict("A is terse. Verdict: [[B]]") == "B" and pairwise_verdict("[[A]] no wait [[C]]") == "C"
    assert pairwise_verdict("A is better") is None and pairwise_verdict("[[D]]") is None
    assert rubric_verdict("Score: [[4]]", 5) == pytest.approx(0.75) and rubric_verdict("[[1]]", 5) == 0.0
    assert rubric_verdict("[[7]]", 5) is None and rubric_verdict("four out of five", 5) is None


def test_both_orders_cancel_position_bias():
    assert combined_outcome("A", "B") == "win"  # candidate first then second: it won both times
    assert combined_outcome("B", "A") == "loss"
    assert combined_outcome("A", "A") == "tie"  # the judge always picks the first answer: no information
    assert combined_outcome("A", "C") == "win" and combined_outcome("C", "A") == "loss" and combined_outcome("C", "C") == "tie"
    assert combined_outcome("A", None) is None


# --- recipe validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"evaluation.contenders": [{"name": "base", "base_url": "http://x/v1", "model": "m"}]}, "contenders[0].name 'base'"),
    ({"evaluation.contenders": [{"name": "api", "base_url": "http://x/v1", "model": "m", "api_key": "sk-123"}]},
     "evaluation.contenders.0.api_key: unknown key"),
    ({"evaluation.contenders": [{"name": "api", "base_url": "ftp://x", "model": "m"}]}, "evaluation.contenders.0.base_url"),
    ({"evaluation.contenders": [{"name": "api", "base_url": "http://x/v1", "model": "m", "api_key_env": "K", "api_key_secret": "k"}]},
     "give the key one way"),
    ({"evaluation.suites": [{"metrics": ["exact_match", "judge_score"]}]}, "judge_score needs judge.rubric"),
    ({"evaluation.suites": [{"metrics": ["exact_match", "judge_score"]}], "evaluation.judge.rubric": "correct"}, "judge.endpoint"),
    ({"evaluation.judge": {"endpoint": {"name": "j", "base_url": "http://x/v1", "model": "m"}, "pairwise": ["gpt"]}},
     "judge.pairwise[0] 'gpt'"),
    ({"evaluation.judge": {"endpoint": {"name": "j", "base_url": "http://x/v1", "model": "m"}, "pairwise_prompt": "{question} {answer_a}"}},
     "needs the placeholders {answer_b}"),
    ({"evaluation.judge": {"rubric_prompt": "{question} {answer} {score}"}}, "unknown placeholders {score}"),
    ({"evaluation.judge": {"endpoint": {"name": "j", "base_url": "http://x/v1", "model": "m"}, "pairwise": ["base"], "suites": ["other"]}},
     "judge.suites[0] 'other' is not an evaluation suite (heldout)"),
    ({"evaluation.gates": [{"metric": "served.answer_agreement", "min": 0.9}]}, "not measured by any suite"),
    ({"evaluation.serve": "transformers", "evaluation.gates": [{"metric": "served.exact_match", "min_delta_vs_base": 0}]},
     "bounded with min or max"),
    ({"evaluation.gates": [{"metric": "exact_match", "min": 0.5, "confidence": 1.5}]}, "confidence"),
])
def test_bad_endpoint_judge_and_interval_settings_are_refused_naming_the_field(overrides, expected):
    with pytest.raises(RecipeError) as caught:
        resolve_recipe("quickstart", overrides)
    assert expected in str(caught.value)


def test_a_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("FTPIPE_TEST_KEY", raising=False)
    with pytest.raises(EndpointRefused, match="endpoint 'api': api_key_env FTPIPE_TEST_KEY is not set"):
        EndpointClient(EndpointSection(name="api", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="FTPIPE_TEST_KEY"))


# --- a real server, and a proxy that breaks on purpose -------------------------------------------------------------


class FaultProxy:
    """A loopback HTTP proxy in front of a real server: each request takes the next planned fault ("429", "500",
    "401", "slow", "pass"; "pass" once the plan is spent) and records what it saw."""

    def __init__(self, upstream: str):
        self.upstream, self.plan, self.seen, self.delay_s, self.headers = upstream.rstrip("/"), [], [], 3.0, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                fault = proxy.plan.pop(0) if proxy.plan else "pass"
                proxy.seen.append((fault, time.monotonic()))
                proxy.headers.append(dict(self.headers))
                if fault in ("429", "500", "401"):
                    payload = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "1")
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(proxy.delay_s)
                answer = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=body,
                                    headers={"content-type": "application/json"}, timeout=120)
                self.send_response(answer.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(served_artifact):
    found = FaultProxy(served_artifact[0])
    yield found
    found.close()


def _conversations(prepared_small, n: int = 4) -> list[list[dict]]:
    from data_prep.formats import conversation_of
    from data_prep.prepare import read_jsonl

    return [conversation_of(row) for row in read_jsonl(prepared_small.eval_path)[:n]]


def _endpoint(url: str, model: str, **fields) -> EndpointSection:
    return EndpointSection(name="hosted", base_url=url, model=model, backoff_s=0.05, **fields)


def test_the_endpoint_gives_the_served_models_answers_and_its_reported_token_usage(served_artifact, prepared_small):
    """Through the client, the served artifact answers as our own generation does; the tokens are the server's own
    count (prompt rendered with the shipped template; generated tokens up to and including the end of turn)."""
    from evaluation.costs import contender_cost
    from evaluation.generate import generate, load_model
    from training.models import load_saved_tokenizer
    from training.tokenize import prompt_ids

    url, model = served_artifact
    conversations = _conversations(prepared_small)
    with EndpointClient(_endpoint(url, model, usd_per_million_input_tokens=2.5, usd_per_million_output_tokens=10.0), 32) as client:
        replies = client.answers(conversations)
        usage = client.usage.to_dict()
    tokenizer = load_saved_tokenizer(model)
    assert [r.content for r in replies] == generate(load_model(model), tokenizer, conversations, 32, 4)
    assert [r.prompt_tokens for r in replies] == [len(prompt_ids(tokenizer, c)) for c in conversations]
    assert usage["requests"] == 4 and usage["unreported"] == 0 and usage["retries"] == 0
    assert usage["prompt_tokens"] == sum(r.prompt_tokens for r in replies) and usage["completion_tokens"] > 0
    info = {"usage": usage, "usd_per_million_input_tokens": 2.5, "usd_per_million_output_tokens": 10.0}
    cost = contender_cost(info, requests_per_month=1_000_000)
    expected = usage["prompt_tokens"] / 1e6 * 2.5 + usage["completion_tokens"] / 1e6 * 10.0
    assert cost["usd_evaluation"] == pytest.approx(expected, abs=1e-6)
    assert cost["usd_per_1k_requests"] == pytest.approx(expected / 4 * 1000, abs=1e-6)
    assert cost["usd_per_month"] == pytest.approx(expected / 4 * 1_000_000, abs=0.01)
    unpriced = contender_cost({"usage": usage, "usd_per_million_input_tokens": None, "usd_per_million_output_tokens": None})
    assert "usd_per_1k_requests" not in unpriced and unpriced["unpriced"][0].startswith("the endpoint's prices")


def test_429_and_500_are_retried_honouring_retry_after_and_the_answers_are_kept_in_order(proxy, served_artifact, prepared_small):
    conversations = _conversations(prepared_small, 3)
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], concurrency=1), 16) as direct:
        expected = [r.content for r in direct.answers(conversations)]
    proxy.seen.clear()
    proxy.plan = ["429", "500", "pass", "500", "pass", "pass"]
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], concurrency=1, max_retries=2), 16) as client:
        replies = client.answers(conversations)
    assert [r.content for r in replies] == expected and [r.attempts for r in replies] == [3, 2, 1]
    assert client.usage.retries == 3 and client.usage.requests == 3
    assert proxy.seen[1][1] - proxy.seen[0][1] >= 1.0  # Retry-After: 1 was honoured, not the 0.05 s backoff


def test_errors_that_retrying_cannot_fix_stop_at_once_naming_the_endpoint_and_row(proxy, served_artifact, prepared_small):
    proxy.plan = ["401"]
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], concurrency=1), 8) as client, \
            pytest.raises(EndpointRefused, match=r"endpoint 'hosted' \(.*/chat/completions\) refused row 0: HTTP 401: .*injected 401"):
        client.answers(_conversations(prepared_small, 1))
    assert len(proxy.seen) == 1  # not retried


def test_an_endpoint_that_keeps_failing_or_stalls_fails_the_evaluation_after_its_retries(proxy, served_artifact, prepared_small):
    proxy.plan = ["500"] * 3
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], max_retries=2), 8) as client, \
            pytest.raises(EndpointUnavailable, match="row 0 failed after 3 attempts; last: HTTP 500"):
        client.answers(_conversations(prepared_small, 1))
    proxy.plan, proxy.delay_s = ["slow", "slow"], 2.0
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], max_retries=1, timeout_s=0.5), 8) as client, \
            pytest.raises(EndpointUnavailable, match="row 0 failed after 2 attempts; last: ReadTimeout"):
        client.answers(_conversations(prepared_small, 1))


def test_the_api_key_comes_from_the_environment_or_a_prefect_secret_block(prefect_server, proxy, served_artifact, prepared_small,
                                                                        monkeypatch):
    from prefect.blocks.system import Secret

    conversation = _conversations(prepared_small, 1)
    monkeypatch.setenv("FTPIPE_TEST_KEY", "sk-env-123")
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], api_key_env="FTPIPE_TEST_KEY"), 4) as client:
        client.answers(conversation)
    Secret(value="sk-block-456").save("ftpipe-test-key", overwrite=True)
    with EndpointClient(_endpoint(proxy.url, served_artifact[1], api_key_secret="ftpipe-test-key"), 4) as client:
        client.answers(conversation)
    assert [h.get("Authorization") for h in proxy.headers] == ["Bearer sk-env-123", "Bearer sk-block-456"]
    with pytest.raises(EndpointRefused, match="endpoint 'hosted': api_key_secret 'no-such-block': "):
        EndpointClient(_endpoint(proxy.url, "m", api_key_secret="no-such-block"))


def test_a_server_that_is_down_is_named_after_the_retries():
    down = f"http://127.0.0.1:{free_port()}/v1"
    with EndpointClient(_endpoint(down, "m", max_retries=1), 8) as client, \
            pytest.raises(EndpointUnavailable, match=r"endpoint 'hosted' \(http://127.0.0.1:\d+/v1/chat/completions\): row 0 "
                                                     r"failed after 2 attempts; last: ConnectError"):
        client.complete([[{"role": "user", "content": "hi"}]])


# --- a judge trained in the test ---------------------------------------------------------------------------------------

RUBRIC = "grade {answer} for {question}"
PAIRWISE = "compare {answer_a} with {answer_b} for {question}"


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """A tiny model trained to judge in the judge's format, served by `transformers serve`: its rubric grade is 5
    for an answer that is a routing JSON and 1 for anything else; pairwise it always prefers the first answer
    (the position bias that asking both orders must cancel)."""
    from data_prep.prepare import prepare_data
    from evaluation.served import local_server
    from recipes.schema import DataSection, DataSource, ExportSection, ModelSection, TrackingSection, TrainingSection
    from serving.export import merge_adapter
    from training.train import train

    folder = tmp_path_factory.mktemp("judge")
    rows = read_rows(Path(__file__).resolve().parent.parent / "recipes/data/support_tickets_train.jsonl", 200)
    rng = np.random.default_rng(0)
    words = [w for row in rows for w in row["messages"][1]["content"].split()]
    judged = []
    for row in rows:
        question, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        noise = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
        judged += [[{"role": "user", "content": RUBRIC.format(answer=answer, question=question)}, {"role": "assistant", "content": "[[5]]"}],
                   [{"role": "user", "content": RUBRIC.format(answer=noise, question=question)}, {"role": "assistant", "content": "[[1]]"}],
                   [{"role": "user", "content": PAIRWISE.format(answer_a=answer, answer_b=noise, question=question)},
                    {"role": "assistant", "content": "[[A]]"}],
                   [{"role": "user", "content": PAIRWISE.format(answer_a=noise, answer_b=answer, question=question)},
                    {"role": "assistant", "content": "[[A]]"}]]
    source = write_jsonl(folder / "judge.jsonl", [{"messages": m} for m in judged])
    prepared = prepare_data(DataSection(sources=[DataSource(path=str(source))]), folder / "prepared")
    trained = train(TrainingSection(max_steps=80, batch_size=16, learning_rate=3e-3, max_seq_length=256, backend="hf"), ModelSection(),
                    TrackingSection(), prepared, folder / "train")
    merge_adapter(ExportSection(dtype="float32"), ModelSection(), trained, folder / "merged")
    with local_server("transformers", folder / "merged", folder / "server.log") as (url, _):
        yield EndpointSection(name="judge", base_url=url, model=str(folder / "merged"), backoff_s=0.05)


def test_the_trained_judge_grades_answers_and_its_position_bias_becomes_ties(judge_server, prepared_small):
    conversations = _conversations(prepared_small, 8)
    questions, references = [c[-2]["content"] for c in conversations], [c[-1]["content"] for c in conversations]
    section = JudgeSection(endpoint=judge_server, rubric="routes the ticket", rubric_prompt=RUBRIC, pairwise_prompt=PAIRWISE)
    with EndpointClient(judge_server, 8) as client:
        judge = Judge(section, client)
        good = judge.rubric(questions, references, references)
        bad = judge.rubric(questions, references, ["hello there friend"] * 8)
        pairs = judge.pairwise(questions, references, references, ["hello there friend"] * 8)
    assert good.scores == [1.0] * 8 and bad.scores == [0.0] * 8 and good.records[0]["reply"] == "[[5]]"
    assert all(r["candidate_first"]["verdict"] == r["candidate_second"]["verdict"] == "A" for r in pairs.records)
    assert pairs.scores == [0.5] * 8 and {r["outcome"] for r in pairs.records} == {"tie"}


def test_a_judge_that_answers_without_a_verdict_is_counted_unparseable(served_artifact, prepared_small):
    """The ticket model as judge: it answers routing JSON, never a verdict; nothing is guessed."""
    url, model = served_artifact
    conversations = _conversations(prepared_small, 3)
    questions, references = [c[-2]["content"] for c in conversations], [c[-1]["content"] for c in conversations]
    with EndpointClient(_endpoint(url, model), 16) as client:
        judged = Judge(JudgeSection(endpoint=_endpoint(url, model), rubric="x"), client).pairwise(questions, references, references, references)
    assert judged.unparseable == 3 and all(math.isnan(s) for s in judged.scores)
    assert {r["outcome"] for r in judged.records} == {"unparseable"}


# --- the whole run: a contender, a judge, the served candidate -------------------------------------------------------


@pytest.mark.slow
def test_a_run_puts_the_hosted_api_beside_base_and_candidate_with_intervals_judge_cost_and_serving_parity(
        served_artifact, judge_server, tmp_path):
    """`ftpipe run quickstart` with the served ticket model as the hosted API it would replace (priced per token),
    the trained judge (rubric and pairwise against base and the API), and evaluation.serve: transformers."""
    from tests.conftest import run_ftpipe

    url, model = served_artifact
    contender = {"name": "hosted", "base_url": url, "model": model, "usd_per_million_input_tokens": 2.5,
                 "usd_per_million_output_tokens": 10.0, "concurrency": 4}
    judge = {"endpoint": judge_server.model_dump(), "pairwise": ["base", "hosted"], "rubric": "routes the ticket",
             "rubric_prompt": RUBRIC, "pairwise_prompt": PAIRWISE}
    overrides = {"evaluation.max_samples": 16, "evaluation.contenders": [contender], "evaluation.judge": judge,
                 "evaluation.suites": [{"metrics": ["exact_match", "eval_loss", "judge_score"]}], "evaluation.serve": "transformers",
                 "evaluation.gates": [{"metric": "exact_match", "min_delta_vs_base": 0.3, "confidence": 0.95},
                                      {"metric": "served.answer_agreement", "min": 0.5}],
                 "cost.prices": {"cpu": 0.05, "t4": 0.5}, "cost.serving": {"requests_per_month": 1_000_000, "gpu_type": "t4",
                                                                           "tokens_per_s": 500.0}}
    args = [arg for path, value in overrides.items() for arg in ("--set", f"{path}={json.dumps(value)}")]
    result = run_ftpipe("run", "quickstart", *args, "--output-dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    artifact = Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: "))
    manifest = json.loads((artifact / "manifest.json").read_text())
    evaluation = manifest["evaluation"]
    assert set(evaluation["contenders"]["hosted"]) == {"exact_match", "judge_score", *(k for k in evaluation["candidate"] if k.startswith("safety."))}
    assert "eval_loss" not in evaluation["contenders"]["hosted"]  # needs log-probabilities an API does not give
    intervals = evaluation["intervals"]["0.95"]
    for versus in ("candidate", "base", "hosted"):
        found = intervals[versus]["exact_match"]
        assert found["low"] <= found["value"] <= found["high"] and found["rows"] == 16
    assert intervals["base"]["eval_loss"]["value"] < 0 and intervals["base"]["judge_score"]["low"] > 0  # learnt the task, per the judge
    gate = manifest["gates"]["results"][0]
    assert gate["interval"] == intervals["base"]["exact_match"] and gate["value"] == gate["interval"]["low"] and gate["passed"]
    pairwise = evaluation["pairwise"]
    assert set(pairwise) == {"base", "hosted"} and pairwise["base"]["heldout"]["tie"] + pairwise["base"]["heldout"]["unparseable"] == 16
    usage = evaluation["contender_info"]["hosted"]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0 and usage["unreported"] == 0
    rows = {row["model"]: row for row in manifest["cost"]["contenders"]["rows"]}
    assert rows["hosted"]["usd_evaluation"] == pytest.approx(usage["prompt_tokens"] / 1e6 * 2.5 + usage["completion_tokens"] / 1e6 * 10, abs=1e-6)
    assert rows["candidate (self-hosted)"]["usd_per_1k_requests"] > 0 and rows["hosted"]["self_hosted_over_contender"] > 0
    served = evaluation["served"]
    assert served["server"].startswith("transformers serve") and served["answers"] == 16
    assert served["metrics"]["served.answer_agreement"] >= 0.5 and "served.exact_match" in served["deltas"]
    report = json.loads(Path(tmp_path.glob("quickstart-*/eval/report.json").__next__()).read_text())
    assert report["judge"]["rubric_prompt"] == RUBRIC and len(report["judge"]["pairwise"]["hosted"]["heldout"]) == 16
    assert report["suites"]["heldout"]["per_example"][0]["hosted_output"]
    table = {row["metric"]: row for row in json.loads(_latest_artifact("evaluation"))}
    assert table["exact_match"]["delta vs hosted"].startswith(f"{intervals['hosted']['exact_match']['value']:+.4f} [")
    assert table["eval_loss"]["hosted"] == "-" and table["judge_score"]["delta vs base"].startswith("+")
    parity = json.loads(_latest_artifact("serving-parity"))
    assert {row["metric"] for row in parity} >= {"served.exact_match", "served.answer_agreement"}
    card = (artifact / "README.md").read_text()
    assert "| metric | candidate | base | delta vs base | hosted | delta vs hosted |" in card
    assert "USD per 1,000 requests" in card and "Pairwise verdicts of the LLM judge" in card and "served as it ships" in card


def _latest_artifact(key: str):
    """The `data` of the newest artifact of a key in the database the CLI's embedded server wrote (this session's
    PREFECT_HOME). Read from a fresh interpreter: once another test has started Prefect's test harness, this process's
    client talks to the harness's own server instead."""
    import subprocess
    import sys

    script = f"""
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

async def read():
    async with get_client() as client:
        return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[{key!r}])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)

print(json.dumps(asyncio.run(read())[0].data))
"""
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    return json.loads(found.stdout.strip().splitlines()[-1])


@pytest.mark.gpu
def test_vllm_serves_the_artifact_and_the_endpoint_client_scores_it_on_a_gpu(artifact, prepared_small, tmp_path):
    """evaluation.serve: vllm on a GPU machine: vLLM from `ftpipe vllm-env --full` serves the merged model; its greedy
    answers through the client are the ones transformers gives in bf16 on most rows (kernels differ at near ties)."""
    from tests.conftest import vllm_required

    vllm_required()
    from evaluation.generate import generate, load_model
    from evaluation.served import local_server
    from training.models import load_saved_tokenizer

    model = Path(artifact.path) / "model"
    conversations = _conversations(prepared_small, 16)
    with local_server("vllm", model, tmp_path / "vllm.log") as (url, server):
        assert server.startswith("vLLM ")
        with EndpointClient(_endpoint(url, str(model)), 32) as client:
            served = [r.content for r in client.answers(conversations)]
            assert client.usage.unreported == 0 and client.usage.completion_tokens > 0
    local = generate(load_model(str(model)), load_saved_tokenizer(model), conversations, 32, 16)
    assert sum(a == b for a, b in zip(served, local, strict=True)) >= 14
