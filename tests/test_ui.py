"""The Prefect UI in a real browser (Debian's chromium, driven by Playwright), screen by screen as a new user walks
it: the form submits a short quickstart that completes, and refuses bad overrides at Submit; a run the recipe's rules
refuse shows the recipe's line, no traceback; training shows its progress (step, loss, tokens/s, time left); the
evaluation tables fit the page and their links open; a reviewer resumes a paused run with the decision form; the UI
reaches its API on a port set as the README says; an authenticated server opens on its login page.
Screenshots go to test-output/ui/."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (ROOT, SHORT_RUN, api, api_response, background, create_run, deployment_id, prefect_server_process,
                            stop, wait_for)

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-output" / "ui"
# As the machine's probe starts it: no sandbox as root, and no background connections (the network is closed).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The UI of a fresh Prefect server with `ftpipe serve` running, in headless chromium."""
    from playwright.sync_api import sync_playwright

    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    out = tmp_path_factory.mktemp("ui-runs")
    with prefect_server_process(tmp_path_factory.mktemp("prefect-ui"), port_by="setting") as (url, env):  # the README's way
        serve = background([sys.executable, "-m", "flows.cli", "serve", "--output-dir", str(out)], env, out / "serve.log")
        try:
            deployment = deployment_id(url, "finetune/finetune", serve, out / "serve.log")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                yield page, url, deployment
                browser.close()
        finally:
            stop(serve)


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def wait_for_text(page, text: str, timeout_s: float, name: str) -> None:
    """Reload the run's page until it shows `text` (the state badge): any visible element with that text, since the
    first one in the page's order can be a hidden copy (the screenshot of a failed wait showed the badge)."""
    deadline = time.monotonic() + timeout_s
    while not page.get_by_text(text, exact=True).filter(visible=True).count():
        if time.monotonic() > deadline:
            shot(page, f"{name}-timeout")
            raise AssertionError(f"the page never showed {text!r} (screenshot {name}-timeout.png)")
        page.wait_for_timeout(3000)
        page.reload()


def test_a_short_recipe_submitted_from_the_form_completes(page):
    page, url, _ = page
    ui = url.removesuffix("/api")
    page.goto(f"{ui}/deployments")
    page.get_by_role("link", name="finetune").first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.get_by_text("recipe (Optional)").wait_for()

    page.get_by_role("button", name="Recipe", exact=True).click()  # the inline recipe: every section as form fields
    for field in ("Name (Optional)", "Model (Optional)", "Base (Optional)", "Training (Optional)", "Evaluation (Optional)"):
        page.get_by_text(field, exact=True).first.wait_for(state="visible")
    shot(page, "1-recipe-fields")
    page.get_by_role("button", name="RecipeName", exact=True).click()  # back to a recipe from recipes/ by name
    overrides_editor(page).fill(json.dumps(SHORT_RUN))
    shot(page, "2-short-recipe")
    run_name = page.locator("xpath=//*[normalize-space(text())='Run Name']/following::input[1]").input_value()
    page.get_by_role("button", name="Submit").click()

    try:  # back on the deployment (not its /run form, which the same glob would match at once), the new run in its list
        page.wait_for_url(lambda address: re.search(r"/deployments/deployment/[^/?]+/?$", address) is not None, timeout=180_000)
    finally:
        shot(page, "2b-submitted")  # what the form showed if the submission did not go through
    page.get_by_role("link", name=run_name).first.click(timeout=120_000)
    page.wait_for_url("**/runs/flow-run/**")
    run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    wait_for_text(page, "Completed", 900, "3-completed")
    shot(page, "3-completed")
    flow_run = api("GET", f"{url}/flow_runs/{run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"]["overrides"] == SHORT_RUN and flow_run["parameters"]["recipe"] == "quickstart"
    COMPLETED_RUNS.append(run_id)


COMPLETED_RUNS: list[str] = []  # the form's run, whose artifacts the table and link tests read


def overrides_editor(page):
    """The overrides parameter's JSON editor (after choosing the object form where the form offers null or object)."""
    for choice in ("object", "dict"):
        button = page.get_by_role("button", name=choice, exact=True)
        if button.count():
            button.first.click()
            break
    return page.locator("textarea.p-code-input__textarea").first


def run_artifacts(url: str, run_id: str) -> dict[str, dict]:
    """The flow run's artifacts by key (the latest version of each)."""
    found = api("POST", f"{url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}, "sort": "CREATED_DESC"})
    by_key: dict[str, dict] = {}
    for artifact in found:
        if artifact["key"]:
            by_key.setdefault(artifact["key"], artifact)
    return by_key


def overflowing(page) -> list[str]:
    """Elements of the artifact's content wider than the box that shows them (a table scrolling sideways)."""
    return page.evaluate("""() => [...document.querySelectorAll('.artifact-data-view table, .artifact-data-view pre')]
        .filter(el => el.scrollWidth > el.parentElement.clientWidth + 1 || el.getBoundingClientRect().right > window.innerWidth)
        .map(el => el.tagName + ' ' + el.scrollWidth + ' > ' + el.parentElement.clientWidth)""")


def test_bad_overrides_are_refused_at_submit_with_the_field_named_and_no_run_made(page):
    page, url, deployment = page
    ui = url.removesuffix("/api")
    before = len(api("POST", f"{url}/flow_runs/filter", json={}))
    page.goto(f"{ui}/deployments/deployment/{deployment}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.get_by_text("Validate parameters").first.wait_for()  # ticked by default: the README says keep it
    overrides_editor(page).fill(json.dumps({"training.lora.rank": 4}))
    page.get_by_role("button", name="Submit").click()
    page.get_by_text("'training.lora.rank' is not valid under any of the given schemas", exact=False).first.wait_for()
    shot(page, "8-bad-overrides-refused")
    assert "/run" in page.url  # still on the form
    assert len(api("POST", f"{url}/flow_runs/filter", json={})) == before


def test_a_run_the_recipe_refuses_shows_the_recipes_line_and_no_traceback(page):
    page, url, deployment = page
    run_id = create_run(url, deployment, {"recipe": "quickstart", "overrides": {"evaluation.gates": [{"metric": "quantized.exact_match",
                                                                                                        "min": 0.5}]}})
    assert wait_for(url, run_id, timeout=300)["state"]["type"] == "FAILED"
    page.goto(f"{url.removesuffix('/api')}/runs/flow-run/{run_id}")
    line = "evaluation.gates[0].metric quantized.exact_match: measured on the quantized export"
    page.get_by_text(line, exact=False).first.wait_for()
    page.wait_for_timeout(2000)  # every log line in
    shot(page, "9-refused-run")
    text = page.inner_text("body")
    assert "Failed" in text and "Traceback" not in text and "Engine execution exited" not in text


def test_training_shows_step_loss_tokens_per_second_and_time_left_while_it_runs(page):
    page, url, deployment = page
    run_id = create_run(url, deployment, {"recipe": "quickstart", "overrides": SHORT_RUN | {"training.max_steps": 120, "name": "progress"}})
    deadline, progress = time.monotonic() + 600, None
    while progress is None or "left" not in (progress.get("description") or ""):
        assert time.monotonic() < deadline, progress
        assert api("GET", f"{url}/flow_runs/{run_id}")["state"]["type"] not in ("FAILED", "CRASHED")
        progress = run_artifacts(url, run_id).get("training-progress")
        time.sleep(0.5)
    page.goto(f"{url.removesuffix('/api')}/artifacts/artifact/{progress['id']}")
    page.get_by_text("tokens/s", exact=False).first.wait_for()
    shot(page, "10-training-progress")
    assert re.search(r"Training: step \d+ of 120 · loss [\d.]+ · [\d,]+ tokens/s · about .+ left", page.inner_text("body"))
    assert wait_for(url, run_id)["state"]["type"] == "COMPLETED"
    done = run_artifacts(url, run_id)["training-progress"]
    assert done["data"] == 100.0 and done["description"] == "Training done: 120 steps"


def test_the_evaluation_tables_fit_the_page_and_every_link_in_the_reports_opens(page):
    page, url, _ = page
    assert COMPLETED_RUNS, "needs the form's completed run"
    ui = url.removesuffix("/api")
    artifacts = run_artifacts(url, COMPLETED_RUNS[0])
    assert {"data-report", "evaluation", "evaluation-examples", "evaluation-examples-full", "safety", "run-result"} <= set(artifacts)
    links = set()
    for number, key in enumerate(("evaluation-examples", "safety", "evaluation", "data-report", "gate-decision", "artifact",
                                  "registry-candidate", "run-result"), 11):
        page.goto(f"{ui}/artifacts/artifact/{artifacts[key]['id']}")
        page.locator(".artifact-data-view").first.wait_for()
        page.wait_for_timeout(1000)
        shot(page, f"{number}-{key}")
        assert overflowing(page) == [], key
        links |= set(page.eval_on_selector_all(".artifact-description a[href], .artifact-data-view a[href]", "els => els.map(e => e.href)"))
    assert f"{ui}/artifacts/artifact/{artifacts['evaluation-examples-full']['id']}" in links
    for link in sorted(links):
        page.goto(link)
        page.wait_for_timeout(1500)
        assert "Page not found" not in page.inner_text("body"), link
    page.goto(f"{ui}/artifacts/artifact/{artifacts['evaluation-examples']['id']}")
    full = page.get_by_role("link", name="evaluation-examples-full").first
    page.goto(full.get_attribute("href"))  # the description's link (the renderer may open it in a new tab)
    page.get_by_text("heldout #1", exact=True).first.wait_for()
    shot(page, "19-evaluation-examples-full")
    result = artifacts["run-result"]["data"]
    assert Path(result["artifact_path"]).is_dir() and result["manifest"]["name"] == "quickstart"


def test_a_reviewer_resumes_a_paused_run_with_the_approval_form(page, tmp_path):
    """The reviewer's path: the form's description names the reviewers; a wrong token is refused (the run pauses
    again), the token `ftpipe registry policy` issued is accepted and the run completes."""
    page, url, deployment = page
    out = Path(api("GET", f"{url}/deployments/{deployment}")["parameters"]["output_dir"])
    policy = subprocess.run([sys.executable, "-m", "flows.cli", "registry", "policy", "reviewed", "--require-approval", "--reviewer",
                             "alice", "--registry", str(out / "registry")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert policy.returncode == 0, policy.stderr
    token = next(line.rsplit(": ", 1)[1] for line in policy.stdout.splitlines() if line.startswith("token for alice"))
    overrides = SHORT_RUN | {"name": "reviewed", "training.seed": 5, "approval.required": True}
    run_id = create_run(url, deployment, {"recipe": "quickstart", "overrides": overrides})
    ui = url.removesuffix("/api")
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    wait_for_text(page, "Paused", 900, "4-paused")
    shot(page, "4-paused")
    for attempt, secret in (("wrong", "ftpipe_guessed"), ("right", token)):
        page.get_by_role("button", name="Resume").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Reviewers: alice", exact=False).first.wait_for()  # the form's description
        links = dialog.locator("a[href]").evaluate_all("els => els.map(e => [e.textContent.trim(), e.href])")
        assert {"evaluation", "evaluation-examples", "safety", "gate-decision"} <= {text for text, _ in links}, links
        assert all("/artifacts/artifact/" in href for _, href in links), links  # this run's reports, not the latest of a key
        shot(page, f"5-approval-form-{attempt}")
        decision = dialog.locator("button.p-select-button__control").first  # approve | reject, chosen with the keyboard
        decision.focus()
        for key in ("ArrowDown", "Enter"):  # the list opens on the first key and takes its time to render
            page.keyboard.press(key)
            page.wait_for_timeout(700)
        assert decision.inner_text().strip() == "approve"
        dialog.get_by_role("textbox").nth(0).fill("alice")  # reviewer, token, comment: the form's text fields in order
        dialog.get_by_role("textbox").nth(1).fill(secret)
        shot(page, f"6-approval-filled-{attempt}")
        dialog.get_by_role("button", name="Submit").click()
        if attempt == "wrong":
            deadline = time.monotonic() + 120
            while api("GET", f"{url}/flow_runs/{run_id}")["state"]["state_details"].get("pause_key") in (None, "decision-1"):
                assert time.monotonic() < deadline, "the run did not pause again after refusing the wrong token"
                time.sleep(1)
            page.reload()
            wait_for_text(page, "Paused", 60, "6b-paused-again")
    wait_for_text(page, "Completed", 300, "7-approved")
    shot(page, "7-approved")
    assert wait_for(url, run_id, timeout=60)["state"]["type"] == "COMPLETED"
    from serving.registry import Registry

    registry = Registry(out / "registry")
    assert registry.aliases("reviewed").get("production") == "1"
    assert [e.event for e in registry.events("reviewed") if e.event.startswith("decision")] == ["decision_refused", "decision"]


def test_the_ui_reaches_its_api_on_a_port_set_as_the_readme_says_and_not_with_port_alone(page, tmp_path):
    """The README's `PREFECT_SERVER_API_PORT=P prefect server start`: the UI asks the API on P (this module's server is
    started so). `--port P` alone, the server not knowing PREFECT_API_URL: the UI still asks 4200."""
    page, url, _ = page
    ui = url.removesuffix("/api")
    assert api("GET", f"{ui}/ui-settings")["api_url"] == url
    page.goto(f"{ui}/deployments")
    page.get_by_role("link", name="finetune").first.wait_for()
    shot(page, "20-port-by-setting")
    with prefect_server_process(tmp_path / "prefect", port_by="option alone") as (other, _):
        assert api("GET", f"{other.removesuffix('/api')}/ui-settings")["api_url"] == "http://127.0.0.1:4200/api"


def test_a_server_with_an_auth_string_opens_on_its_login_page_and_takes_the_auth_string(page, tmp_path):
    page, _, _ = page
    with prefect_server_process(tmp_path / "prefect", port_by="setting", PREFECT_SERVER_API_AUTH_STRING="admin:s3cret") as (url, _):
        assert api_response("POST", f"{url}/flows/filter", json={}).status_code == 401
        page.goto(url.removesuffix("/api"))
        password = page.locator("input[type=password]").first
        password.wait_for()
        shot(page, "21-login")
        password.fill("admin:s3cret")
        page.keyboard.press("Enter")
        page.get_by_role("link", name="Deployments").first.wait_for()
        page.goto(f"{url.removesuffix('/api')}/deployments")
        page.wait_for_timeout(2000)
        shot(page, "22-logged-in")
        assert "Unauthorized" not in page.inner_text("body") and "401" not in page.inner_text("body")
