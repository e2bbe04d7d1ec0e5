"""The Prefect UI in a real browser (Debian's chromium, driven by Playwright): a data scientist opens the finetune
deployment, opens Run -> Custom run, sees the recipe's fields in the form, submits a short quickstart and watches the
run reach Completed; a reviewer opens a run paused for approval and resumes it with the decision form.
Screenshots go to test-output/ui/."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHORT_RUN, api, background, create_run, deployment_id, prefect_server_process, stop, wait_for

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
    with prefect_server_process(tmp_path_factory.mktemp("prefect-ui")) as (url, env):
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
    """Reload the run's page until it shows `text` (the state badge)."""
    deadline = time.monotonic() + timeout_s
    while not page.get_by_text(text, exact=True).first.is_visible():
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
    page.get_by_role("button", name="dict", exact=True).click()
    page.locator("textarea.p-code-input__textarea").first.fill(json.dumps(SHORT_RUN))  # the overrides' JSON editor
    shot(page, "2-short-recipe")
    run_name = page.locator("xpath=//*[normalize-space(text())='Run Name']/following::input[1]").input_value()
    page.get_by_role("button", name="Submit").click()

    page.wait_for_url("**/deployments/deployment/**")  # back on the deployment, the new run in its list
    page.get_by_role("link", name=run_name).first.click()
    page.wait_for_url("**/runs/flow-run/**")
    run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    wait_for_text(page, "Completed", 900, "3-completed")
    shot(page, "3-completed")
    flow_run = api("GET", f"{url}/flow_runs/{run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"]["overrides"] == SHORT_RUN and flow_run["parameters"]["recipe"] == "quickstart"


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
